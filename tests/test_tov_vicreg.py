"""TOV-VICReg: the loss terms against their formulas (written out in `reference_loss`) and properties,
the method's shapes and gradients, and a short end-to-end run: real Atari play -> shards -> pretrain
(TensorBoard events) -> AtariARI-style RAM probe of the run, its random init and raw pixels."""

import json
import math

import pytest
import torch

from conftest import image_tags, read_scalars, run_submit
from selfsup.ssl.tov_vicreg.heads import TemporalOrderHead, expander
from selfsup.ssl.tov_vicreg.loss import (
    BCE_BEST_CONSTANT,
    BCE_X_SLOT_KNOWN,
    PERMUTATIONS,
    describe_temporal_bce,
    covariance_loss,
    invariance_loss,
    permute_triplets,
    sample_permutations,
    temporal_loss,
    tov_vicreg_loss,
    variance_loss,
)


def reference_loss(p_x, p_y, logits, labels, sim, std, cov, temporal):
    """L = sim I + std V + cov C + temporal T (docs/methods/tov_vicreg.md), term by term with Python loops (float64)."""
    p_x, p_y = p_x.double(), p_y.double()
    b, d = p_x.shape
    inv = sum(((p_x[i, j] - p_y[i, j]) ** 2).item() for i in range(b) for j in range(d)) / (b * d)

    def var_term(p):
        c = p - p.mean(0)
        return sum(max(0.0, 1.0 - math.sqrt(c[:, j].var(unbiased=True).item() + 1e-4)) for j in range(d)) / d

    def cov_term(p):
        c = p - p.mean(0)
        m = c.T @ c / (b - 1)
        return sum(m[i, j].item() ** 2 for i in range(d) for j in range(d) if i != j) / d

    var = 0.5 * var_term(p_x) + 0.5 * var_term(p_y)
    cv = cov_term(p_x) + cov_term(p_y)
    t = sum(-(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))
            for z, y in zip(logits.double().tolist(), labels.tolist(), strict=True)) / b
    return sim * inv + std * var + cov * cv + temporal * t


def test_loss_matches_the_written_out_formula():
    g = torch.Generator().manual_seed(0)
    p_x, p_y = torch.randn(12, 6, generator=g) * 0.7, torch.randn(12, 6, generator=g) * 1.5
    logits, labels = torch.randn(12, generator=g), (torch.rand(12, generator=g) > 0.5).float()
    out = tov_vicreg_loss(p_x, p_y, logits, labels)  # defaults: the run script's 10, 10, 10, 0.1
    expected = reference_loss(p_x, p_y, logits, labels, 10.0, 10.0, 10.0, 0.1)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert out["variance"].item() > 0 and out["covariance"].item() > 0


def test_variance_term_zero_above_std_one_and_099_at_collapse():
    g = torch.Generator().manual_seed(1)
    wide_x, wide_y = 3 * torch.randn(256, 64, generator=g), 3 * torch.randn(256, 64, generator=g)
    assert variance_loss(wide_x, wide_y).item() == 0.0
    collapsed = torch.randn(1, 64, generator=g).expand(256, 64)
    assert variance_loss(collapsed, collapsed).item() == pytest.approx(0.99, abs=1e-6)  # 1 - sqrt(1e-4)


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while len(h) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def test_covariance_zero_for_orthogonal_centred_columns_and_permutation_invariant():
    cols = hadamard(16)[:, 1:9] * torch.tensor([0.5, 1, 2, 3, 4, 5, 6, 7])  # centred, mutually orthogonal
    assert cols.sum(0).abs().max() == 0
    assert covariance_loss(cols, cols).item() == pytest.approx(0.0, abs=1e-10)
    g = torch.Generator().manual_seed(2)
    p_x, p_y = torch.randn(32, 10, generator=g), torch.randn(32, 10, generator=g) @ torch.randn(10, 10, generator=g)
    perm = torch.randperm(10, generator=g)
    assert covariance_loss(p_x, p_y).item() > 0.1
    assert covariance_loss(p_x[:, perm], p_y[:, perm]).item() == pytest.approx(covariance_loss(p_x, p_y).item(), rel=1e-5)


def test_invariance_zero_iff_equal_and_total_loss_symmetric():
    g = torch.Generator().manual_seed(3)
    p_x, p_y = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    assert invariance_loss(p_x, p_x.clone()).item() == 0.0
    assert invariance_loss(p_x, p_y).item() > 0
    assert invariance_loss(p_x, p_x + 1e-3).item() > 0
    logits, labels = torch.randn(16, generator=g), torch.ones(16)
    a, b = tov_vicreg_loss(p_x, p_y, logits, labels), tov_vicreg_loss(p_y, p_x, logits, labels)
    assert a["loss"].item() == pytest.approx(b["loss"].item(), rel=1e-6)


def test_terms_are_float32_under_bf16_inputs():
    g = torch.Generator().manual_seed(4)
    p_x, p_y = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    logits, labels = torch.randn(64, generator=g), torch.zeros(64)
    half = tov_vicreg_loss(p_x.bfloat16(), p_y.bfloat16(), logits.bfloat16(), labels)
    full = tov_vicreg_loss(p_x.bfloat16().float(), p_y.bfloat16().float(), logits.bfloat16().float(), labels)
    for k, v in half.items():
        assert v.dtype == torch.float32
        assert v.item() == pytest.approx(full[k].item(), rel=1e-6), k


def test_terms_stay_float32_inside_autocast():
    g = torch.Generator().manual_seed(6)
    p_x, p_y = torch.randn(64, 256, generator=g), torch.randn(64, 256, generator=g)
    logits, labels = torch.randn(64, generator=g), torch.ones(64)
    full = tov_vicreg_loss(p_x, p_y, logits, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = tov_vicreg_loss(p_x, p_y, logits, labels)
    for k, v in amp.items():  # a bf16 covariance matmul would be off by ~1e-3 relative
        assert v.dtype == torch.float32 and v.item() == pytest.approx(full[k].item(), rel=1e-6), k


def test_temporal_labels_identity_only_and_one_in_six():
    perms, labels = sample_permutations(60000, generator=torch.Generator().manual_seed(5))
    identity = (perms == torch.tensor([0, 1, 2])).all(1)
    assert torch.equal(labels == 0, identity)
    p0 = (labels == 0).float().mean().item()
    assert abs(p0 - 1 / 6) < 4 * math.sqrt((1 / 6) * (5 / 6) / 60000)
    counts = torch.stack([(perms == p).all(1).sum() for p in PERMUTATIONS])
    assert counts.sum() == 60000 and counts.min() > 9500  # all six orders are drawn
    stack = torch.randn(60000, 3, 5)
    shuffled = permute_triplets(stack, perms)
    assert torch.equal(shuffled[identity], stack[identity]) and not torch.equal(shuffled, stack)
    inverse = torch.argsort(perms, dim=1)
    assert torch.equal(permute_triplets(shuffled, inverse), stack)


def test_temporal_loss_is_bce_on_the_order():
    logits = torch.tensor([5.0, -5.0])
    assert temporal_loss(logits, torch.tensor([1.0, 0.0])).item() < 0.01
    assert temporal_loss(logits, torch.tensor([0.0, 1.0])).item() > 4.9


def test_shapes_vit_t_patch8_84px_through_the_registry():
    from selfsup.launch.config import compose
    from selfsup.ssl import method_class

    cfg = compose("tov_vicreg", "vit_t", ["data=/tmp/unused-shards/x.tar"])
    assert dict(cfg.backbone.kwargs) == {"img_size": 84, "patch_size": 8}
    m = cfg.method
    assert (m.sim_weight, m.std_weight, m.cov_weight, m.temporal_weight) == (10.0, 10.0, 10.0, 0.1)
    assert list(m.expander) == [1024, 1024, 1024]
    module = method_class("tov_vicreg")(cfg)
    x = torch.rand(2, 3, 84, 84)
    tokens = module.backbone.forward_features(x)
    assert tokens.shape == (2, 101, 192)  # 10 x 10 patches + CLS
    r = module.backbone(x)
    assert r.shape == (2, 192) and torch.allclose(r, tokens[:, 0])  # the final-LayerNorm CLS token
    assert module.projector(r).shape == (2, 1024)
    assert module.temporal_head.linear.in_features == 576
    layers = [type(layer).__name__ for layer in module.projector]
    assert layers == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert module.projector[-1].bias is None


def tiny_method(temporal_weight: float, backbone: str = "vit_tiny_test"):
    from selfsup.launch.config import compose
    from selfsup.ssl import method_class

    cfg = compose("tov_vicreg", backbone, ["data=/tmp/unused-shards/x.tar", f"method.temporal_weight={temporal_weight}",
                                           "method.expander=[64,64,64]"])
    return method_class("tov_vicreg")(cfg)


@pytest.mark.parametrize("backbone", ["vit_tiny_test", "resnet_tiny"])
def test_step_gradients_reach_encoder_and_head(backbone):
    torch.manual_seed(0)
    module = tiny_method(0.1, backbone)
    batch = {k: torch.rand(8, 3, 84, 84) for k in "xyzw"}
    out = module.pretext_step(batch)
    out["loss"].backward()
    assert module.temporal_head.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in module.backbone.parameters() if p.requires_grad)
    assert 0.0 <= out["terms"]["temporal_acc"].item() <= 1.0


def test_temporal_weight_zero_is_plain_vicreg():
    torch.manual_seed(0)
    module = tiny_method(0.0)
    batch = {k: torch.rand(8, 3, 84, 84) for k in "xyzw"}
    out = module.pretext_step(batch)
    out["loss"].backward()
    assert module.temporal_head.linear.weight.grad.abs().sum() == 0
    terms = out["terms"]
    expected = 10 * terms["invariance"] + 10 * terms["variance"] + 10 * terms["covariance"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_head_sees_current_previous_next_in_the_sampled_order():
    head = TemporalOrderHead(4)
    with torch.no_grad():
        head.linear.weight.copy_(torch.arange(12.0)[None])
        head.linear.bias.zero_()
    cur, prev, nxt = torch.ones(1, 4), 2 * torch.ones(1, 4), 3 * torch.ones(1, 4)
    w = torch.arange(12.0).view(3, 4).sum(1)  # weight mass per slot: 6, 22, 38
    assert head(cur, prev, nxt, torch.tensor([[0, 1, 2]])).item() == pytest.approx(float(w @ torch.tensor([1.0, 2, 3])))
    assert head(cur, prev, nxt, torch.tensor([[2, 0, 1]])).item() == pytest.approx(float(w @ torch.tensor([3.0, 1, 2])))
    assert expander(8, [16, 4])(torch.randn(3, 8)).shape == (3, 4)


@pytest.mark.timeout(3000)
@pytest.mark.long
def test_end_to_end_pretrain_and_ram_probe(tmp_path):
    data = tmp_path / "atari"
    run_submit("shards", "atari", data, "--games", "Pong,Breakout", "--frames", "400", "--test-frames", "200",
               "--samples-per-shard", "1", timeout=1200, check=True)
    run_submit("pretrain", "tov_vicreg", "vit_tiny_test", f"data={data}/train", "trainer.max_steps=12",
               "data.batch_size=16", "data.num_workers=1", "optim.name=adamw", "optim.lr=5e-4", "optim.scale_lr=false",
               "optim.warmup_epochs=0.0", "trainer.log_every_n_steps=2", "images_every_n_steps=10",
               "trainer.enable_progress_bar=false", f"run_dir={tmp_path}", "run_name=r", timeout=1500, check=True,
               in_process=True)
    run = tmp_path / "r"
    scalars = read_scalars(run / "tb")
    for term in ("loss", "invariance", "variance", "covariance", "temporal", "temporal_acc"):
        assert f"train/{term}" in scalars, term
    assert all(math.isfinite(v) for _, v in scalars["train/loss"])
    assert "tov_vicreg/x_y_prev_next" in image_tags(run / "tb")
    probe_args = ["data=atari_ram", f"data.train={data}/train", f"data.test={data}/test", "probe.train_samples=150",
                  "probe.weight_decays=[0.0,0.001]", "probe.max_iter=50"]
    proc = run_submit("probe", run, *probe_args, timeout=1200, check=True)
    assert "mean F1" in proc.stdout and "player_y" in proc.stdout and "ball_x" in proc.stdout
    result = json.loads((run / "probe_atari_ram.json").read_text())
    names = {(r["game"], r["variable"]) for r in result["variables"]}
    assert ("Pong", "player_y") in names and ("Breakout", "blocks_hit_count") in names and len(names) == 13
    assert 0.0 < result["mean_f1"] <= 1.0 and result["train_samples"] == {"Breakout": 150, "Pong": 150}
    assert all(0.0 <= r["f1"] <= 1.0 for r in result["variables"])
    assert "probe/ram_f1_mean" in read_scalars(run / "tb")
    # the baselines: the same encoder at random init, and raw pixels. Each prints its table; no score is
    # compared here, so their regressions end after 10 L-BFGS iterations (the 7056 pixel values cost
    # seconds per iteration over the 13 variables)
    for target, extra in ((f"random:vit_tiny_test", ["backbone.kwargs.img_size=84", "backbone.kwargs.patch_size=12"]),
                          ("pixels", [])):
        proc = run_submit("probe", target, *probe_args, *extra, "probe.max_iter=10", timeout=1200, check=True)
        assert "mean F1" in proc.stdout
    bad = run_submit("probe", run, "data=atari_ram", "data.train=/nonexistent/x.tar", f"data.test={data}/test")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_temporal_bce_landmarks_are_the_constant_and_the_x_slot_answers():
    perms, labels = PERMUTATIONS, (torch.arange(6) != 0).float()  # each permutation once: the exact mean
    constant = torch.full((6,), math.log(5.0))  # P(shuffled) = 5/6
    assert temporal_loss(constant, labels).item() == pytest.approx(BCE_BEST_CONSTANT, abs=1e-6)
    # sure where x is not first, 1/2 where it is (identity or previous/next swapped)
    x_first = perms[:, 0] == 0
    x_slot = torch.where(x_first, torch.tensor(0.0), torch.tensor(30.0))
    assert temporal_loss(x_slot, labels).item() == pytest.approx(BCE_X_SLOT_KNOWN, abs=1e-6)
    assert BCE_BEST_CONSTANT == pytest.approx(0.4506, abs=1e-4) and BCE_X_SLOT_KNOWN == pytest.approx(0.2310, abs=1e-4)
    assert "constant" in describe_temporal_bce(0.5) and "slot" in describe_temporal_bce(0.3)
    assert "previous from next" in describe_temporal_bce(0.1)


def test_equal_previous_and_next_stacks_are_left_out_of_the_temporal_term():
    torch.manual_seed(0)
    module = tiny_method(1.0)
    batch = {k: torch.rand(8, 3, 84, 84) for k in "xyzw"}
    batch["distinct"] = torch.tensor([True] * 5 + [False] * 3)
    torch.manual_seed(1)
    kept = module.pretext_step(batch)["terms"]
    torch.manual_seed(1)
    perms, labels = sample_permutations(8)
    logits = module.temporal_head(*module.encode(batch["x"], batch["z"], batch["w"]), perms)
    assert kept["temporal"].item() == pytest.approx(temporal_loss(logits[:5], labels[:5]).item(), rel=1e-5)
    assert kept["temporal_kept"].item() == pytest.approx(5 / 8)
    batch["distinct"] = torch.zeros(8, dtype=torch.bool)  # nothing to order: no temporal gradient at all
    module.zero_grad()
    out = module.pretext_step(batch)
    out["loss"].backward()
    assert out["terms"]["temporal"].item() == 0.0
    assert module.temporal_head.linear.weight.grad is None or module.temporal_head.linear.weight.grad.abs().sum() == 0
