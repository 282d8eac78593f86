"""The mini-batch solver of the linear probe (selfsup/eval/minibatch.py): every (penalty, lr) pair
trained at once in one batched layer, the choice on validation, and `probe.solver`."""

import pytest
import torch
from omegaconf import OmegaConf

from selfsup.eval.linear import linear_probe
from selfsup.eval.minibatch import MinibatchSettings, feature_stats, minibatch_probe, train_pairs
from selfsup.eval.solver import resolve_solver
from test_probe import blobs

FAST = MinibatchSettings(epochs=4, batch_size=256, lrs=(0.03, 0.3))


def test_minibatch_probe_separates_blobs_and_matches_lbfgs_on_overlapping_ones():
    x, y = blobs(1000)
    xt, yt = blobs(500, seed=1)
    result = minibatch_probe(x, y, xt, yt, 4, settings=FAST, weight_decays=(0.0, 1e-3))
    assert result["top1"] > 97 and result["top5"] == 100
    assert [(r["weight_decay"], r["lr"]) for r in result["sweep"]] == [(0.0, 0.03), (0.0, 0.3), (1e-3, 0.03), (1e-3, 0.3)]
    # overlapping classes: the mini-batch fit lands where the converged full-batch one does
    x, y = blobs(2000, noise=4.0)
    xt, yt = blobs(1000, seed=1, noise=4.0)
    lbfgs = linear_probe(x, y, xt, yt, 4, weight_decays=(0.0, 1e-3))["top1"]
    minibatch = minibatch_probe(x, y, xt, yt, 4, settings=FAST, weight_decays=(0.0, 1e-3))["top1"]
    assert 60 < lbfgs and abs(minibatch - lbfgs) < 2.0, (minibatch, lbfgs)


def test_a_diverging_pair_is_flagged_never_chosen_and_leaves_the_others_alone():
    # penalty 1 at lr 1e4: every step multiplies the weights by about -1e4: inf, then nan
    x, y = blobs(1000, noise=2.0)
    xt, yt = blobs(300, seed=1, noise=2.0)
    settings = MinibatchSettings(epochs=3, batch_size=200, lrs=(0.1, 1e4))
    result = minibatch_probe(x, y, xt, yt, 4, settings=settings, weight_decays=(1e-4, 1.0))
    sweep = {(r["weight_decay"], r["lr"]): r for r in result["sweep"]}
    assert sweep[(1.0, 1e4)].get("diverged") and sweep[(1.0, 1e4)]["val_top1"] == 0.0
    assert result["chosen"] != {"weight_decay": 1.0, "lr": 1e4}
    assert result["top1"] > 80
    alone = minibatch_probe(x, y, xt, yt, 4, settings=MinibatchSettings(epochs=3, batch_size=200, lrs=(0.1,)),
                            weight_decays=(1e-4,))
    assert alone["sweep"][0]["val_top1"] == pytest.approx(sweep[(1e-4, 0.1)]["val_top1"], abs=0.5)


def test_pairs_trained_together_equal_each_pair_trained_alone():
    x, y = blobs(600, d=24, k=5, noise=3.0)
    decays, lrs = [0.0, 1e-3, 1e-2], [0.3, 0.03, 0.1]
    settings = MinibatchSettings(epochs=2, batch_size=64)
    together, _ = train_pairs(x, y, 5, decays, lrs, settings, seed=7)
    for i, (wd, lr) in enumerate(zip(decays, lrs)):
        (alone,), _ = train_pairs(x, y, 5, [wd], [lr], settings, seed=7)
        torch.testing.assert_close(together[i].weight, alone.weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(together[i].bias, alone.bias, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(together[0].weight, together[1].weight)  # the pairs did differ
    (other_seed,), _ = train_pairs(x, y, 5, decays[:1], lrs[:1], settings, seed=8)
    assert not torch.allclose(other_seed.weight, together[0].weight)


def test_feature_stats_of_bf16_rows_match_torch():
    x = torch.randn(3000, 8) * 5 + 2
    rows = torch.randperm(3000)[:2000]
    mean, std = feature_stats(x.bfloat16(), rows)
    reference = x.bfloat16()[rows].float()
    torch.testing.assert_close(mean, reference.mean(0))
    torch.testing.assert_close(std, reference.std(0))


def test_batched_top_k_in_chunks_equals_each_classifier_scored_alone(monkeypatch):
    from selfsup.eval import minibatch
    from selfsup.eval.linear import LinearClassifier, topk_accuracy

    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(5, generator=g), torch.rand(5, generator=g) + 0.5  # one standardisation, as a sweep's
    classifiers = [LinearClassifier(torch.randn(7, 5, generator=g), torch.randn(7, generator=g), mean, std)
                   for _ in range(3)]
    x, y = torch.randn(1000, 5, generator=g), torch.randint(0, 7, (1000,), generator=g)
    rows = torch.randperm(1000, generator=g)[:300]
    monkeypatch.setattr(minibatch, "SCORE_ELEMENTS", 3 * 7 * 64)  # chunks of 64 rows
    scores = minibatch.batched_topk(classifiers, x, y, "cpu", rows, ks=(1, 5))
    expected = [[topk_accuracy(c.logits(x[rows]), y[rows], k) for k in (1, 5)] for c in classifiers]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-4)


def probe_cfg(**overrides):
    cfg = OmegaConf.load("configs/probe.yaml").probe
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def test_auto_keeps_lbfgs_for_ordinary_data_and_goes_minibatch_at_imagenet_size():
    cfg = probe_cfg()
    assert resolve_solver(cfg, 60_000, 512, 10) == "lbfgs"  # Fashion-MNIST features
    assert resolve_solver(cfg, 1_281_167, 2048, 1000) == "minibatch"  # ImageNet-1k with a ResNet-50
    assert resolve_solver(probe_cfg(solver="minibatch"), 100, 8, 2) == "minibatch"
    assert resolve_solver(probe_cfg(solver="lbfgs"), 1_281_167, 2048, 1000) == "lbfgs"


def test_probe_with_the_minibatch_solver_records_it():
    from selfsup.eval.probe import run_probe

    # 8 px: the digits' own resolution, 64 pixel features
    result = run_probe("pixels", ["data=digits", "data.image_size=8", "probe.solver=minibatch", "probe.minibatch.epochs=4",
                                  "probe.minibatch.batch_size=128", "probe.weight_decays=[0.0,1e-3]"])
    linear = result["linear"]
    assert linear["solver"] == "minibatch" and linear["device"] == "cpu"
    assert len(linear["sweep"]) == 2 * 3 and set(linear["chosen"]) == {"weight_decay", "lr"}
    assert linear["top1"] > 85  # raw pixels of the digits: L-BFGS scores about 95
    assert f"lr={linear['chosen']['lr']:g} (minibatch)" in result.table("pixels")
    assert result["probe"]["minibatch"]["epochs"] == 4


def test_atari_ram_variables_fit_with_the_configured_solver():
    from selfsup.eval.atari_ram import probe_variable

    x, y = blobs(600)
    xt, yt = blobs(200, seed=1)
    ram, ram_test = (y * 50 + 7).numpy(), (yt * 50 + 7).numpy()  # byte values, not class indices
    for solver in ("auto", "minibatch"):
        cfg = OmegaConf.create({"probe": probe_cfg(solver=solver, **{"minibatch.epochs": 3, "minibatch.batch_size": 128})})
        row = probe_variable(x, ram, xt, ram_test, cfg)
        assert row["solver"] == ("lbfgs" if solver == "auto" else "minibatch")
        assert ("lr" in row) == (solver == "minibatch") and row["f1"] > 0.95 and row["train_values"] == 4
