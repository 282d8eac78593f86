"""OBoW against the official code's maths (docs/methods/obow.md), the order of operations in one step, bit-identical
resume of the teacher / queues / vocabularies, the official recipe, and TensorBoard output."""

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import image_tags, read_scalars, run_submit
from selfsup.data.views import multi_crop_view, patch_grid
from selfsup.core.errors import UserError
from selfsup.launch.config import compose
from selfsup.ssl.ema import ema_update_
from selfsup.ssl.obow import (Vocabulary, WeightGenerator, bag_of_words, bow_kl, bow_logits, bow_targets, entropy,
                              obow_loss, repeat_per_crop, soft_codes, soft_cross_entropy, squared_distances,
                              teacher_momentum)
from selfsup.ssl.obow.method import OBoW

TINY = ["data=digits", "image_size=32", "data.batch_size=8", "data.num_workers=0", "method.num_words=64",
        "method.border=0", "method.online_probe=false", "method.views.teacher_resize=32", "method.views.crop_size=24",
        "method.views.patch_image_size=48", "method.views.patch_size=16", "method.views.patch_jitter=6"]


# ---- targets: distributions over words; one-hot codes give a uniform bag -----------------------
def test_targets_are_distributions_over_words():
    torch.manual_seed(0)
    fmap, words = torch.randn(4, 16, 7, 7), torch.randn(32, 16).clamp(min=0)
    bow, codes = bow_targets(fmap, words, inv_delta=15.0, scale=torch.tensor(3.0), border=1)
    assert bow.shape == (4, 32) and codes.shape == (4, 32, 5, 5)  # 1-pixel border dropped: 7 -> 5
    assert (bow >= 0).all() and torch.allclose(bow.sum(1), torch.ones(4), atol=1e-6)
    assert torch.allclose(codes.sum(1), torch.ones(4, 5, 5), atol=1e-6)


def test_distance_formula_is_squared_euclidean():
    torch.manual_seed(0)
    fmap, words = torch.randn(3, 8, 5, 6), torch.randn(20, 8)
    d = squared_distances(fmap, words)
    expected = torch.cdist(fmap.permute(0, 2, 3, 1).reshape(-1, 8), words).pow(2)
    assert d.shape == (3, 20, 5, 6)
    assert torch.allclose(d.permute(0, 2, 3, 1).reshape(-1, 20), expected, atol=1e-4)


def test_sharp_codes_give_uniform_bow_over_distinct_nearest_words():
    torch.manual_seed(0)
    words = torch.randn(10, 6)
    # every location is a (slightly perturbed) copy of a chosen word: image 0 uses words {1, 4}, image 1 {7}
    chosen = torch.tensor([[1, 4, 1, 1], [7, 7, 7, 7]])
    fmap = (words[chosen] + 0.01 * torch.randn(2, 4, 6)).permute(0, 2, 1).reshape(2, 6, 2, 2)
    codes = soft_codes(squared_distances(fmap, words), inv_delta=1e6, scale=1.0)
    assert torch.allclose(codes.amax(1), torch.ones(2, 2, 2))  # one-hot
    bow = bag_of_words(codes)
    expected = torch.zeros(2, 10)
    expected[0, [1, 4]] = 0.5
    expected[1, 7] = 1.0
    assert torch.allclose(bow, expected, atol=1e-6)


# ---- the loss: KL = soft-target cross-entropy minus target entropy --------------------------
def test_kl_is_soft_cross_entropy_minus_target_entropy_and_nonnegative():
    torch.manual_seed(0)
    targets = bag_of_words(torch.rand(6, 50, 3, 3).pow(4))
    logits = torch.randn(6, 50) * 3
    kl = bow_kl(logits, targets)
    assert torch.allclose(kl, soft_cross_entropy(logits, targets) - entropy(targets), atol=1e-5)
    assert torch.allclose(kl, F.kl_div(F.log_softmax(logits, 1), targets, reduction="batchmean"), atol=1e-5)
    assert kl > 0
    # zero iff the prediction equals the target (targets with exact zeros included)
    targets[0, :10] = 0
    targets = targets / targets.sum(1, keepdim=True)
    assert bow_kl(torch.log(targets.clamp_min(1e-30)), targets).abs() < 1e-5


def test_loss_sums_groups_and_averages_levels_with_image_major_targets():
    torch.manual_seed(0)
    b, k = 3, 12
    targets = [torch.softmax(torch.randn(b, k), 1) for _ in range(2)]
    logits = [[torch.randn(b * 2, k) for _ in range(2)], [torch.randn(b * 5, k) for _ in range(2)]]
    total, per_level = obow_loss(logits, targets, [2, 5])
    by_hand = 0.0
    for group, n in zip(logits, (2, 5)):
        for level in range(2):
            rows = [F.kl_div(F.log_softmax(group[level][i * n + j], 0), targets[level][i], reduction="sum")
                    for i in range(b) for j in range(n)]
            by_hand += torch.stack(rows).mean() / 2
    assert torch.allclose(total, by_hand, atol=1e-5)
    assert torch.allclose(total, (per_level[0] + per_level[1]) / 2)
    assert torch.equal(repeat_per_crop(torch.arange(3)[:, None], 2).flatten(), torch.tensor([0, 0, 1, 1, 2, 2]))


# ---- the queue: every word overwritten once per K / global batch steps ----------------------
def test_queue_overwrites_every_word_once_per_cycle_and_needs_a_divisor():
    vocab = Vocabulary(num_words=12, channels=3, inv_delta=10.0)
    assert (vocab.words >= 0).all() and vocab.scale.item() == 0.5 and vocab.pointer.item() == 0
    writes = torch.zeros(12, dtype=torch.long)
    for step in range(3):  # K / B = 12 / 4
        before = vocab.words.clone()
        vocab.enqueue(torch.full((4, 3), -1.0 - step))
        changed = (vocab.words != before).any(1)
        writes += changed.long()
        assert changed.sum() == 4
    assert writes.tolist() == [1] * 12 and vocab.pointer.item() == 0
    assert (vocab.words[:4] == -1).all() and (vocab.words[8:] == -3).all()
    with pytest.raises(UserError, match="multiple of the global batch"):
        vocab.enqueue(torch.zeros(5, 3))


def test_running_scale_includes_the_current_batch_before_coding():
    torch.manual_seed(0)
    vocab = Vocabulary(num_words=16, channels=4, inv_delta=10.0, border=1)
    fmap = torch.randn(2, 4, 5, 5)
    d = squared_distances(fmap[:, :, 1:-1, 1:-1], vocab.words)
    expected_scale = 0.99 * 0.5 + 0.01 * d.amin(1).mean()
    bow, _ = vocab.targets(fmap)
    assert torch.allclose(vocab.scale, expected_scale)
    assert torch.allclose(bow, bag_of_words(torch.softmax(-10.0 / expected_scale * d, 1)))
    vocab.eval()
    vocab.targets(fmap)
    assert torch.allclose(vocab.scale, expected_scale)  # no update outside training


# ---- the teacher: theta_t <- alpha theta_t + (1 - alpha) theta_s ----------------------------
def test_teacher_ema_is_exact_and_starts_as_a_no_op():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    expected = [0.99 * t.detach() + 0.01 * s.detach() for t, s in zip(teacher.parameters(), student.parameters())]
    ema_update_(teacher, student, 0.99)
    for t, e in zip(teacher.parameters(), expected):
        assert torch.allclose(t, e, atol=0, rtol=1e-6)
    assert teacher_momentum(0, 100) == 0.99 and teacher_momentum(100, 100) == 1.0
    assert abs(teacher_momentum(50, 100) - 0.995) < 1e-12

    model = OBoW(compose("obow", "resnet_tiny", TINY))
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert model.teachers() == [(model.backbone, model.teacher)]
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    assert model.update_teachers() == 0.99  # α(0)
    assert all(torch.equal(before[k], v) for k, v in model.teacher.state_dict().items())


# ---- the generated head: unit rows, |logits| <= kappa ||f|| ---------------------------------
def test_generated_weights_have_unit_rows_and_bound_the_logits():
    torch.manual_seed(0)
    gen = WeightGenerator(16, 32)
    w = gen(torch.randn(64, 16).clamp(min=0))
    assert w.shape == (64, 32) and torch.allclose(w.norm(dim=1), torch.ones(64), atol=1e-5)
    f = torch.randn(10, 32) * 7
    z = bow_logits(f, w, kappa=5.0)
    assert (z.abs() <= 5.0 * f.norm(dim=1, keepdim=True) + 1e-4).all()


# ---- the order of operations inside one step (docs/methods/obow.md, steps 2-8) --------------
def test_one_step_follows_the_spec_order():
    torch.manual_seed(0)
    cfg = compose("obow", "resnet_tiny", TINY)
    model = OBoW(cfg).train()
    model.total_steps = 4
    with torch.no_grad():  # a student different from the teacher, so that the EMA is visible
        for p in model.backbone.parameters():
            p.add_(0.1 * torch.randn_like(p))
    view = multi_crop_view(cfg.data.mean, cfg.data.std, teacher_size=32, teacher_resize=32, num_crops=2, crop_size=24,
                           num_patches=5, patch_image_size=48, patch_size=16, patch_jitter=6)
    from PIL import Image

    images = [Image.fromarray((torch.rand(28, 28, 3) * 255).byte().numpy()) for _ in range(8)]
    samples = [view(img) for img in images]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    batch["label"] = torch.full((8,), -1)

    import copy

    ref = copy.deepcopy(model)
    words_before = [v.words.clone() for v in ref.vocabularies]
    step = model.pretext_step
    seen = []
    model.pretext_step = lambda b: seen.append(step(b)) or seen[-1]  # the base's step: EMA, then pretext_step
    with pytest.warns(UserWarning, match="self.log"):  # no trainer here: nothing is logged
        model.training_step(batch, 0)
    out = seen[0]
    # teacher = EMA(α(0)) of the step's student, applied before the targets
    ema_update_(ref.teacher, ref.backbone, 0.99)
    for t, r in zip(model.teacher.parameters(), ref.teacher.parameters()):
        assert torch.equal(t, r)
    stages = ref.teacher.forward_stages(batch["image"])
    for level, (vocab, ref_vocab) in enumerate(zip(model.vocabularies, ref.vocabularies)):
        fmap = stages[ref.levels[level]]
        expected_scale = 0.99 * 0.5 + 0.01 * squared_distances(fmap, words_before[level]).amin(1).mean()
        assert torch.allclose(vocab.scale, expected_scale)
        expected = bag_of_words(soft_codes(squared_distances(fmap, words_before[level]), vocab.inv_delta, expected_scale))
        assert torch.allclose(out["pictures"]["targets"][level], expected, atol=1e-6)
        # the queue moved by one batch; its new rows are teacher vectors, not the old random words
        assert vocab.pointer.item() == 8
        assert not torch.equal(vocab.words[:8], words_before[level][:8])
        assert torch.equal(vocab.words[8:], words_before[level][8:])
    # the student predicted against the vocabulary *before* the enqueue
    crops = [batch["crops"].flatten(0, 1), batch["patches"].flatten(0, 1)]
    feats = [ref.backbone(c) for c in crops]
    weights = [g(w) for g, w in zip(ref.generators, words_before)]
    logits = [[bow_logits(f, w, cfg.method.kappa) for w in weights] for f in feats]
    expected_loss, _ = obow_loss(logits, out["pictures"]["targets"], [2, 5])
    assert torch.allclose(out["loss"], expected_loss, atol=1e-5)
    # and not against the vocabulary after it
    weights_after = [g(v.words) for g, v in zip(ref.generators, model.vocabularies)]
    after_loss, _ = obow_loss([[bow_logits(f, w, cfg.method.kappa) for w in weights_after] for f in feats],
                              out["pictures"]["targets"], [2, 5])
    assert not torch.allclose(out["loss"], after_loss, atol=1e-3)


def test_multi_crop_view_shapes_and_patch_grid():
    from PIL import Image

    view = multi_crop_view([0.5] * 3, [0.5] * 3, teacher_size=32, teacher_resize=32, num_crops=2, crop_size=24,
                           num_patches=5, patch_image_size=48, patch_size=16, patch_jitter=6)
    out = view(Image.new("RGB", (28, 28), "gray"))
    assert out["image"].shape == (3, 32, 32) and out["crops"].shape == (2, 3, 24, 24)
    assert out["patches"].shape == (5, 3, 16, 16)
    # the official lattice: 256 px, 96 px patches, jitter 24 -> step 68; patches lie inside their cells
    image = torch.arange(256.0)[None, None, :].expand(1, 256, 256)  # value = x coordinate
    torch.manual_seed(0)
    patches = patch_grid(image, 96, 24, keep=9)
    lefts = sorted(int(p[0, 0, 0]) for p in patches)
    for n, left in enumerate(lefts):
        assert (n // 3) * 68 <= left <= (n // 3) * 68 + 24
    assert len({int(p[0, 0, 0]) for p in patch_grid(image, 96, 24, keep=5)}) <= 5


# ---- resume: teacher, queues, vocabularies bit-identical --------------------------------------
class StopAt(pl.Callback):
    """Stops the run after `step` optimizer steps (an interruption: the run's schedule stays that of
    the full run, as when a timed or killed run is resumed)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _fixed_batches(cfg, n, seed=0):
    from PIL import Image

    from selfsup.data.stream import collate

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    view = OBoW(cfg).train_view()
    batches = []
    for _ in range(n):
        samples = [{"key": "k", "label": -1, **view(Image.fromarray((torch.rand(28, 28, 3, generator=g) * 255).byte().numpy()))}
                   for _ in range(cfg.data.batch_size)]
        batches.append(collate(samples))
    return batches


class Batches:
    """A stream that resumes where it stopped: the batch of global step s is batches[s % n], however
    the run was cut (a plain list would restart at its first batch after a mid-epoch stop)."""

    def __init__(self, batches):
        self.batches = batches
        self.trainer = None

    def __iter__(self):
        start = self.trainer.global_step
        return (self.batches[(start + i) % len(self.batches)] for i in range(len(self.batches)))

    def __len__(self):
        return len(self.batches)


def _fit(cfg, run_dir, batches, stop_at=None, resume=False):
    from selfsup.launch.train import build_trainer

    pl.seed_everything(cfg.seed, verbose=False)
    module = OBoW(cfg)
    trainer = build_trainer(cfg, run_dir, module=module, extra_callbacks=[StopAt(stop_at)] if stop_at else ())
    ckpt = str(run_dir / "checkpoints" / "last.ckpt") if resume else None
    stream = Batches(batches)
    stream.trainer = trainer
    trainer.fit(module, train_dataloaders=stream, ckpt_path=ckpt, weights_only=True)
    return module, trainer


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()
            if k.startswith(("teacher.", "vocabularies.", "generators.", "backbone."))}


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    steps_per_epoch = 3
    cfg = compose("obow", "resnet_tiny", [*TINY, "trainer.max_steps=6", "trainer.max_epochs=-1",
                                          "trainer.enable_progress_bar=false", "checkpoint_every_n_steps=100",
                                          "images_every_n_steps=0", "optim.name=sgd", "optim.lr=0.05"])
    batches = _fixed_batches(cfg, steps_per_epoch)
    whole, trainer = _fit(cfg, tmp_path / "whole", batches)
    assert trainer.global_step == 6
    first, trainer = _fit(cfg, tmp_path / "parts", batches, stop_at=3)
    assert trainer.global_step == 3
    saved = torch.load(tmp_path / "parts" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # the state at the stop is in the checkpoint: teacher, queues (words + pointer), μ, generators
    for key, value in _state(first).items():
        assert torch.equal(saved["state_dict"][key], value), key
    assert saved["state_dict"]["vocabularies.0.pointer"].item() == (3 * 8) % 64
    resumed, trainer = _fit(cfg, tmp_path / "parts", batches, resume=True)
    assert trainer.global_step == 6
    a, b = _state(whole), _state(resumed)
    assert a.keys() == b.keys() and any(k.startswith("vocabularies.1.words") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # and the run did move: the teacher and the queues are not at their initial values
    fresh = _state(OBoW(cfg))
    assert not torch.equal(a["teacher.net.conv1.weight"], fresh["teacher.net.conv1.weight"])
    assert not torch.equal(a["vocabularies.0.words"], fresh["vocabularies.0.words"])


# ---- recipes, CLI, TensorBoard --------------------------------------------------------------
def test_official_recipe_in_dry_run():
    proc = run_submit("pretrain", "obow", "resnet50", "data=/data/train-{000000..000009}.tar", "--dry-run", check=True)
    cfg = yaml.safe_load(proc.stdout)
    m, o = cfg["method"], cfg["optim"]
    assert m["levels"] == [-2, -1] and m["num_words"] == 8192 and m["inv_delta"] == 15 and m["kappa"] == 8
    assert m["teacher_momentum"] == 0.99 and m["border"] == 1 and m["decay_everything"]
    v = m["views"]
    assert (v["num_crops"], v["crop_size"], v["num_patches"], v["patch_size"]) == (2, 160, 5, 96)
    assert cfg["data"]["image_size"] == 224
    assert (o["name"], o["lr"], o["momentum"], o["nesterov"], o["weight_decay"]) == ("sgd", 0.03, 0.9, False, 1e-4)
    assert o["warmup_epochs"] == 10 and cfg["trainer"]["max_epochs"] == 200
    # the headline command (no data: the demo data) keeps the official method and optimizer
    demo = yaml.safe_load(run_submit("pretrain", "obow", "resnet50", "--dry-run", check=True).stdout)
    assert demo["method"]["num_words"] == 8192 and demo["optim"]["lr"] == 0.03
    rn18 = compose("obow", "resnet18", ["data=/data/x.tar"])
    assert (rn18.method.inv_delta, rn18.method.kappa) == (10, 5)


def test_refusals_are_one_line():
    proc = run_submit("pretrain", "obow", "vit_t", "--dry-run")
    assert proc.returncode == 2 and "needs a convnet" in proc.stderr


@pytest.mark.long
def test_resnet50_recipe_trains_one_step_at_small_resolution(tmp_path):
    # the official recipe (2 levels, 1-pixel border, κ 8, δ⁻¹ 15, SGD, wd on everything) at 96 px with
    # scaled views (the teacher's block3 / block4 maps are 6x6 / 3x3, 4x4 / 1x1 without their border) and
    # 1024 words instead of 8192: the generators over 8192 words cost ~0.7 TFLOP per step, 45x the network
    run_submit("pretrain", "obow", "resnet50", "data=digits", "image_size=96", "data.batch_size=4", "method.num_words=1024",
               "data.num_workers=0", "method.views.teacher_resize=96", "method.views.crop_size=64",
               "method.views.patch_image_size=96", "method.views.patch_size=32", "method.views.patch_jitter=8",
               "trainer.max_steps=1", "trainer.log_every_n_steps=1", "images_every_n_steps=1",
               "trainer.enable_progress_bar=false", f"run_dir={tmp_path}", "run_name=r", timeout=900, check=True,
               in_process=True)
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    assert ckpt["global_step"] == 1 and sd["vocabularies.0.words"].shape == (1024, 1024)
    assert sd["vocabularies.1.words"].shape == (1024, 2048) and sd["vocabularies.1.pointer"].item() == 4
    scalars = read_scalars(tmp_path / "r" / "tb")
    for tag in ("train/loss", "train/loss_stage3", "train/loss_stage4", "train/perplexity_stage4",
                "train/word_usage_stage3", "train/teacher_momentum"):
        assert tag in scalars, (tag, sorted(scalars))
    assert math.isfinite(scalars["train/loss"][0][1])
    assert ckpt["selfsup"]["config"]["optim"]["name"] == "sgd" and ckpt["selfsup"]["config"]["method"]["kappa"] == 8
    assert "obow/words_stage3_nearest_patches" in image_tags(tmp_path / "r" / "tb")


def test_queue_size_must_divide_by_the_global_batch(tmp_path):
    proc = run_submit("pretrain", "obow", "resnet_tiny", *TINY, "method.num_words=60", "trainer.max_steps=1",
                      f"run_dir={tmp_path}", "run_name=r")
    assert proc.returncode == 2 and "multiple of the global batch" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
