"""Linear probe, k-NN, and `submit probe`."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import run_submit
from selfsup.eval.linear import knn_probe, linear_probe, select_hyperparameters, train_linear


def blobs(n, d=16, k=4, seed=0, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.randint(0, k, (n,), generator=g)
    return centres[y] + noise * torch.randn(n, d, generator=g), y


def test_linear_probe_and_knn_separate_blobs():
    x, y = blobs(2000)
    xt, yt = blobs(500, seed=1)
    assert linear_probe(x, y, xt, yt, 4)["top1"] > 97
    assert knn_probe(x, y, xt, yt, 4)["top1"] > 97


def test_chance_level_on_random_labels():
    x, _ = blobs(2000)
    y = torch.randint(0, 4, (2000,), generator=torch.Generator().manual_seed(5))
    xt, _ = blobs(1000, seed=1)
    yt = torch.randint(0, 4, (1000,), generator=torch.Generator().manual_seed(6))
    assert linear_probe(x, y, xt, yt, 4)["top1"] < 32


def test_hyperparameters_never_depend_on_the_test_split():
    x, y = blobs(1500, noise=4.0)
    xt, yt = blobs(500, seed=1, noise=4.0)
    a = linear_probe(x, y, xt, yt, 4)
    garbage_x, garbage_y = torch.randn_like(xt) * 100, torch.randint(0, 4, yt.shape)
    b = linear_probe(x, y, garbage_x, garbage_y, 4)
    assert a["chosen"] == b["chosen"] and a["sweep"] == b["sweep"]
    assert select_hyperparameters(x, y, 4)[0] == a["chosen"]  # the selection sees the train split only


def test_default_fit_reaches_the_optimum_on_correlated_features():
    """Overlapping classes seen through correlated, ill-conditioned features (as real network features
    are): the default L-BFGS budget reaches the minimum of the penalised loss, where 150 iterations
    (the old default) stopped short of it."""
    g = torch.Generator().manual_seed(0)
    n, d, k = 5000, 128, 10  # the number of samples hardly moves the iterations L-BFGS needs; the conditioning does
    y = torch.randint(0, k, (n,), generator=g)
    z = torch.randn(k, d, generator=g)[y] + 8.0 * torch.randn(n, d, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    x = z @ (rotation * torch.logspace(0, -3, d)) @ rotation.T
    wd = 1e-5

    def penalised_loss(clf):
        return (F.cross_entropy(clf.logits(x), y) + 0.5 * wd * clf.weight.pow(2).sum()).item()

    default = penalised_loss(train_linear(x, y, k, weight_decay=wd))
    longer = penalised_loss(train_linear(x, y, k, weight_decay=wd, max_iter=3000))
    early = penalised_loss(train_linear(x, y, k, weight_decay=wd, max_iter=150))
    assert default - longer < 1e-4
    assert early - longer > 1e-2

@pytest.mark.long
def test_submit_probe_random_and_run_folder(tmp_path):
    # the command's plumbing, not the probe's optimum (test_default_fit_reaches_the_optimum_on_correlated_features):
    # 100 L-BFGS iterations per fit
    short = "probe.max_iter=100"
    proc = run_submit("probe", "random:resnet_tiny", "data=digits", short, check=True)
    assert "linear" in proc.stdout and "k-NN" in proc.stdout
    run_submit("pretrain", "rotnet", "resnet_tiny", "data=digits", "data.num_workers=0", "trainer.max_steps=3",
               f"run_dir={tmp_path}", "run_name=r", check=True, in_process=True)
    run = tmp_path / "r"
    run_submit("probe", run, short, check=True)
    result = json.loads((run / "probe.json").read_text())
    assert result["global_step"] == 3 and result["test_samples"] == 360
    assert 0 <= result["linear"]["top1"] <= 100 and result["knn"]["k"] == 20
    assert result["linear"]["solver"] == "lbfgs"  # probe.solver=auto on data of this size
    cached = list((run / "probe").glob("features-*.pt"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    run_submit("probe", run, short, check=True)
    assert cached[0].stat().st_mtime_ns == stamp  # features reused, not extracted again


def test_features_under_bf16_autocast_are_float32_and_close_to_fp32():
    # probe.precision=bf16-mixed: the convolutions run in bf16, the features come back as float32
    # within bf16's rounding of the fp32 ones
    from selfsup.backbones.registry import create_backbone
    from selfsup.eval.probe import extract_features

    torch.manual_seed(0)
    net = create_backbone("resnet_tiny")
    batches = [{"image": torch.randn(16, 3, 32, 32), "label": torch.arange(16)} for _ in range(2)]
    fp32, labels = extract_features(net, batches)
    bf16, _ = extract_features(net, batches, autocast=torch.bfloat16)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape == (32, net.num_features)
    error = ((bf16 - fp32).norm() / fp32.norm()).item()
    assert 0 < error < 0.02, error
    assert torch.equal(labels, torch.cat([torch.arange(16)] * 2))


@pytest.mark.parametrize("command", ["probe", "export"])
def test_bad_checkpoints_are_one_line_errors(tmp_path, command):
    truncated = tmp_path / "truncated.ckpt"
    good = {"state_dict": {"w": torch.zeros(1000)}, "selfsup": {}}
    torch.save(good, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    for bad in (truncated, text, tmp_path / "missing.ckpt"):
        args = [command, bad] + (["-o", tmp_path / "out.safetensors"] if command == "export" else [])
        proc = run_submit(*args)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr


def test_a_small_split_is_decoded_once_per_process_and_a_changed_shard_is_decoded_again(tmp_path, monkeypatch):
    """The probes after the first on the same split (a run, its random init, raw pixels) get the same
    decoded batches; a shard rewritten since, or a split over the size limit, is read again."""
    import os

    import selfsup.data.stream as stream
    from conftest import write_keyed_shards
    from selfsup.eval import decoded_splits
    from selfsup.eval.classification import GROUP, ImageClassification
    from selfsup.eval.probe import probe_config

    write_keyed_shards(tmp_path, shards=2, per_shard=20)
    spec = str(tmp_path / "train-{000000..000001}.tar")
    cfg = probe_config(["data=digits", "data.num_workers=0", "data.image_size=8", "probe.batch_size=16"], None)
    passes = []
    real_loader = stream.eval_loader
    monkeypatch.setattr(stream, "eval_loader", lambda *a, **k: passes.append(1) or real_loader(*a, **k))

    def read():
        return list(ImageClassification().labelled_batches(cfg, "train", spec)[GROUP])

    decoded_splits.forget_all()
    first, second = read(), read()
    assert len(passes) == 1 and sum(len(b["label"]) for b in first) == 40
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
               for a, b in zip(first, second, strict=True))
    shard = tmp_path / "train-000001.tar"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    read()
    assert len(passes) == 2  # the shard changed: decoded again
    decoded_splits.forget_all()
    monkeypatch.setattr(decoded_splits, "LIMIT_BYTES", 100)  # less than one batch
    read(), read()
    assert len(passes) == 4 and not decoded_splits._kept
