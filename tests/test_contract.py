"""The method contract (selfsup/ssl/base.py, docs/methods/contract.md): every registered method
satisfies it; parameter groups, optimizers and clipping as each method's official recipe sets them;
the schedule's length and warm-up from the data, whichever bound ends the run first."""

import copy
import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from selfsup.data.contract import TrainView
from selfsup.core.errors import UserError
from selfsup.launch.config import compose
from selfsup.ssl import METHODS, method_class
from selfsup.ssl.base import PretextOutput
from selfsup.ssl.ema import ema_update_

OBOW_TINY = ["data=digits", "image_size=32", "data.batch_size=8", "method.num_words=64", "method.border=0",
             "method.views.teacher_resize=32", "method.views.crop_size=24", "method.views.patch_image_size=48",
             "method.views.patch_size=16", "method.views.patch_jitter=6"]
TOV_TINY = ["data=/tmp/unused-shards/x.tar", "method.expander=[64,64,64]"]


def _images(*shape):
    return torch.randn(*shape)


# method -> (tiny backbone, overrides, one batch of 8)
TINY = {
    "rotnet": ("resnet_tiny", [], lambda: {"image": _images(8, 3, 32, 32)}),
    "obow": ("resnet_tiny", OBOW_TINY, lambda: {"image": _images(8, 3, 32, 32), "crops": _images(8, 2, 3, 24, 24),
                                                "patches": _images(8, 5, 3, 16, 16)}),
    "sit": ("vit_tiny_test", [], lambda: {"view1": _images(8, 3, 32, 32), "view2": _images(8, 3, 32, 32)}),
    "spark": ("resnet_tiny", ["data=digits", "image_size=32", "method.decoder_width=64"],
              lambda: {"image": _images(8, 3, 32, 32)}),
    "tov_vicreg": ("vit_tiny_test", TOV_TINY, lambda: {k: torch.rand(8, 3, 84, 84) for k in "xyzw"}),
}


def tiny(method: str, *overrides: str, num_classes: int | None = 10):
    backbone, base, _ = TINY[method]
    return method_class(method)(compose(method, backbone, [*base, *overrides]), num_classes=num_classes)


def named_groups(module, groups) -> dict[str, set[str]]:
    names = {id(p): n for n, p in module.named_parameters()}
    return {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}


class _Pictures:
    def __init__(self):
        self.tags = []

    def add_image(self, tag, grid, step, dataformats):
        assert dataformats == "HWC" and grid.ndim == 3 and grid.shape[-1] == 3
        self.tags.append(tag)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_registered_method_satisfies_the_contract(method):
    assert set(TINY) == set(METHODS), "a new method: give it a tiny configuration here"
    torch.manual_seed(0)
    module = tiny(method).train()
    # the view is the data layer's Protocol
    assert isinstance(module.train_view(), TrainView)
    # parameter groups: a partition of the trainable parameters, one name per group
    groups = module.parameter_groups()
    assert len({g["name"] for g in groups}) == len(groups)
    assert {g["name"] for g in groups} <= {"decay", "no_decay", "online_probe"}
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert len(seen) == len(set(seen)), "a parameter in two groups"
    assert set(seen) == trainable, "trainable parameters outside every group"
    assert all(g["weight_decay"] == 0.0 for g in groups if g["name"] != "decay")
    # teachers: (student, teacher) pairs of matching, frozen parameters
    for student, teacher in module.teachers():
        s, t = list(student.parameters()), list(teacher.parameters())
        assert [p.shape for p in s] == [p.shape for p in t]
        assert all(p.requires_grad for p in s) and not any(p.requires_grad for p in t)
        assert not {id(p) for p in t} & set(seen)
    # one step: a PretextOutput
    batch = {**TINY[method][2](), "label": torch.full((8,), -1)}
    out = module.pretext_step(batch)
    assert set(out) <= set(PretextOutput.__annotations__) and "loss" in out
    assert out["loss"].ndim == 0 and out["loss"].requires_grad and torch.isfinite(out["loss"])
    assert all(torch.as_tensor(v).numel() == 1 for v in out.get("terms", {}).values())
    if "features" in out:
        assert out["features"].shape == (8, module.backbone.num_features)
    # and its pictures render
    pictures = _Pictures()
    object.__setattr__(module, "_trainer", SimpleNamespace(logger=SimpleNamespace(experiment=pictures), global_step=0))
    try:
        with torch.no_grad():
            module.log_pictures(batch, out)
    finally:
        object.__setattr__(module, "_trainer", None)
    assert method == "obow" or pictures.tags  # OBoW draws its words only where some are in use


def test_declared_names_are_prefixed_with_the_module_path():
    module = tiny("sit")
    assert {"sit_token", "backbone.net.cls_token", "backbone.net.pos_embed"} <= module.declared_no_weight_decay()
    spark = tiny("spark")
    assert spark.declared_no_weight_decay() == {f"densify.mask_tokens.{i}" for i in range(4)}


# ---- a few real optimizer set-ups: fit up to the first batch -----------------------------------
class _Stop(Exception):
    pass


class _StopAtTrainStart(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        raise _Stop


def configure(module, batches_per_epoch: int = 10, **trainer_kwargs) -> pl.Trainer:
    """Everything `trainer.fit` does before the first batch (optimizer, schedule), on a loader of
    `batches_per_epoch` batches; nothing is trained."""
    data = [{"image": torch.zeros(3, 32, 32), "label": 0}] * (4 * batches_per_epoch)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[_StopAtTrainStart()],
                         **trainer_kwargs)
    with pytest.raises(_Stop):
        trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=4))
    return trainer


@pytest.mark.parametrize("trainer_kwargs,total,warmup", [
    ({"max_epochs": 3}, 30, 10),                                       # max_epochs alone
    ({"max_epochs": 3, "max_steps": 12}, 12, 10),                      # max_steps ends the run first
    ({"max_epochs": -1, "max_steps": 12}, 12, 10),                     # endless epochs, max_steps
    ({"max_epochs": 3, "accumulate_grad_batches": 2}, 15, 5),          # optimizer steps, not batches
    ({"max_epochs": 3, "max_steps": 12, "limit_train_batches": 4}, 12, 4),  # what Lightning runs per epoch
])
def test_warmup_epochs_count_the_optimizer_steps_of_one_epoch(trainer_kwargs, total, warmup):
    module = tiny("rotnet", "optim.warmup_steps=0", "optim.warmup_epochs=1.0", "optim.warmup_start_ratio=0.0",
                  num_classes=None)
    trainer = configure(module, **trainer_kwargs)
    assert (module.total_steps, module.warmup_steps) == (total, warmup)
    schedule = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert schedule(warmup - 1) < 1.0 and schedule(warmup) == 1.0
    assert schedule(total) == pytest.approx(0.0, abs=1e-12)


def test_warmup_steps_win_and_an_endless_run_is_refused():
    module = tiny("rotnet", "optim.warmup_steps=7", "optim.warmup_epochs=1.0", num_classes=None)
    configure(module, max_epochs=-1, max_steps=20)
    assert (module.total_steps, module.warmup_steps) == (20, 7)
    with pytest.raises(UserError, match="trainer.max_steps"):
        configure(tiny("rotnet", num_classes=None), max_epochs=-1, max_steps=-1)


# ---- SparK: LAMB, mask tokens without decay, one clipping at 5 --------------------------------
def test_spark_groups_follow_the_official_rule():
    module = tiny("spark", num_classes=None)
    groups = named_groups(module, module.parameter_groups())
    params = dict(module.named_parameters())
    # official: no decay for 1-D parameters, biases and any name holding "mask_token"
    official = {n for n, p in params.items() if p.ndim == 1 or n.endswith(".bias") or "mask_token" in n}
    assert groups["no_decay"] == official and groups["decay"] == set(params) - official
    assert {f"densify.mask_tokens.{i}" for i in range(4)} <= groups["no_decay"]


def _lamb_reference(params, grads_per_step, group_of, betas, eps):
    """LAMB written out (bias-corrected Adam direction plus L2 weight decay, scaled by ||w|| / ||u||
    where the weight decay is not 0), no clipping."""
    params = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            lr, wd = group_of[i]
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            u = (m[i] / (1 - betas[0] ** t)) / ((v[i] / (1 - betas[1] ** t)).sqrt() + eps)
            ratio = 1.0
            if wd:
                u = u + wd * p
                w_norm, u_norm = p.norm(), u.norm()
                ratio = (w_norm / u_norm).item() if w_norm > 0 and u_norm > 0 else 1.0
            p -= lr * ratio * u
    return params


def test_spark_lamb_clips_once_at_five():
    from timm.optim import Lamb

    module = tiny("spark", num_classes=None)
    assert module.cfg.optim.clip_grad == 5.0
    trainer = configure(module, max_steps=10)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, Lamb) and optimizer.defaults["max_grad_norm"] is None
    for g in optimizer.param_groups:
        g["lr"] = 0.01
    params = [p for g in optimizer.param_groups for p in g["params"]]
    group_of = [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups for _ in g["params"]]
    start = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(0)
    raw = []
    for norm in (1000.0, 3.0):  # far above the clip, then below it (the default LAMB would clip it at 1)
        grads = [torch.randn(p.shape, generator=generator) for p in params]
        scale = norm / torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        raw.append([g * scale for g in grads])

    def clipped(grads, at):
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        return [g * min(1.0, at / float(total)) for g in grads]

    for grads in raw:  # the Lightning step: gradients, the module's clipping, the optimizer
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        module.configure_gradient_clipping(optimizer)
        optimizer.step()
    betas, eps = optimizer.defaults["betas"], optimizer.defaults["eps"]
    once = _lamb_reference(start, [clipped(g, 5.0) for g in raw], group_of, betas, eps)
    twice = _lamb_reference(start, [clipped(clipped(g, 5.0), 1.0) for g in raw], group_of, betas, eps)
    gap = max(float((a - b).abs().max()) for a, b in zip(once, twice, strict=True))
    err = max(float((p.detach() - r).abs().max()) for p, r in zip(params, once, strict=True))
    assert gap > 1e-4  # the reference tells the two apart
    assert err < 1e-3 * gap


# ---- TOV-VICReg: LARS on every tensor of more than one dimension --------------------------------
def test_tov_vicreg_lars_groups_follow_the_official_rule():
    module = tiny("tov_vicreg", num_classes=None)
    groups = named_groups(module, module.parameter_groups())
    params = dict(module.named_parameters())
    assert groups["decay"] == {n for n, p in params.items() if p.ndim > 1}
    assert groups["no_decay"] == {n for n, p in params.items() if p.ndim <= 1}
    assert {"backbone.net.pos_embed", "backbone.net.cls_token"} <= groups["decay"]

    trainer = configure(module, max_steps=10)
    optimizer = trainer.optimizers[0]
    assert type(optimizer).__name__ == "Lars"
    by_name = {g["name"]: g for g in optimizer.param_groups}
    decay, exempt = by_name["decay"], by_name["no_decay"]
    assert decay["weight_decay"] == 1e-6 and decay["always_adapt"] and decay["trust_coeff"] == 0.001
    assert exempt["weight_decay"] == 0.0 and not exempt["always_adapt"]
    # one step: the exempt group is plain SGD (first momentum step = the gradient), the decay group
    # gets weight decay and the trust ratio
    names = {id(p): n for n, p in module.named_parameters()}
    before = {names[id(p)]: p.detach().clone() for g in optimizer.param_groups for p in g["params"]}
    generator = torch.Generator().manual_seed(0)
    grads = {}
    for g in optimizer.param_groups:
        g["lr"] = 0.5
        for p in g["params"]:
            p.grad = grads.setdefault(names[id(p)], torch.randn(p.shape, generator=generator))
    optimizer.step()
    params = dict(module.named_parameters())
    for n in ("backbone.net.norm.weight", "backbone.net.blocks.0.attn.qkv.bias", "projector.0.bias"):
        torch.testing.assert_close(params[n].detach(), before[n] - 0.5 * grads[n], rtol=0, atol=1e-6)
    for n in ("backbone.net.pos_embed", "backbone.net.cls_token", "projector.0.weight"):
        w, g = before[n], grads[n]
        ratio = 0.001 * w.norm() / (g.norm() + 1e-6 * w.norm() + 1e-8)  # timm's LARS trust ratio, eps 1e-8
        torch.testing.assert_close(params[n].detach(), w - 0.5 * ratio * (g + 1e-6 * w), rtol=1e-5, atol=1e-7)
        assert not torch.allclose(params[n].detach(), w - 0.5 * g)


# ---- teachers: one EMA per optimizer step -------------------------------------------------------
def test_teachers_move_once_per_optimizer_step():
    torch.manual_seed(0)
    module = tiny("obow", "method.online_probe=false", num_classes=None).train()
    module.total_steps = 10
    with torch.no_grad():
        for p in module.backbone.parameters():
            p.add_(0.1 * torch.randn_like(p))
    expected = copy.deepcopy(module.teacher)
    ema_update_(expected, module.backbone, 0.99)
    batch = {**TINY["obow"][2](), "label": torch.full((8,), -1)}
    with pytest.warns(UserWarning, match="self.log"):  # no trainer: nothing is logged
        for _ in range(2):  # two micro-batches of one optimizer step (global_step stays 0)
            module.training_step(batch, 0)
    for t, e in zip(module.teacher.parameters(), expected.parameters(), strict=True):
        assert torch.equal(t, e)
    assert math.isclose(module.ema_momentum(), 0.99)
