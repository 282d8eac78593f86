"""The shared base of every method: backbone from the registry, optimizer parameter groups, per-step
LR (and optional weight-decay) schedules, EMA teachers, logging of every loss term, the optional
online linear probe, and the checkpoint metadata that `submit export` reads. The contract between a
method and the base is in `SSLMethod`'s docstring (and docs/methods/contract.md).
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase
from typing import Any, Required, TypedDict

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from selfsup.backbones import create_backbone
from selfsup.core.errors import UserError
from selfsup.data import views
from selfsup.data.contract import TrainView
from selfsup.ssl.ema import cosine_momentum, ema_update_


class PretextOutput(TypedDict, total=False):
    """What `SSLMethod.pretext_step` returns.

    - `loss` (required): the scalar that is optimised; logged as `train/loss`.
    - `terms`: scalars logged as `train/<name>` (loss terms, accuracies, monitors), detached by the base.
    - `features`: `[B, D]` pooled embeddings of the batch's images, the online probe's input (detached
      by the base); leave it out when no embedding fits.
    - `pictures`: whatever the method's `log_pictures` needs (tensors, lists), read only there.
    """

    loss: Required[torch.Tensor]
    terms: dict[str, torch.Tensor | float]
    features: torch.Tensor
    pictures: dict[str, Any]


def warmup_cosine(step: int, total: int, warmup: int, start_ratio: float, min_ratio: float, schedule: str) -> float:
    """LR multiplier at `step`: linear warm-up from `start_ratio`, then cosine (or flat) to `min_ratio`."""
    if warmup > 0 and step < warmup:
        return start_ratio + (1.0 - start_ratio) * step / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def is_decay_group(group: dict) -> bool:
    """Whether an optimizer parameter group is (part of) the weight-decay group: named "decay", or
    "decay.<part>" where a module splits it further (e.g. by layer, for layer-wise LR decay)."""
    return str(group.get("name", "")).split(".")[0] == "decay"


def cosine_value(start: float, end: float, step: int, total: int) -> float:
    progress = min(1.0, step / max(1, total))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class SSLMethod(pl.LightningModule):
    """The base of every self-supervised method.

    A method (a subclass) defines:
    - `name`: the key it is registered under in `selfsup.ssl.METHODS`;
    - `__init__(cfg, num_classes=None)`: calls the base first (which builds `self.backbone` from the
      registry and the optional online probe), then builds its heads;
    - `pretext_step(batch) -> PretextOutput`: the loss of one batch, its logged terms, the probe's
      features and the picture data (see `PretextOutput`);
    - `train_view() -> TrainView` (optional; default: the crop-and-flip or resized-crop view that
      `method.view` names): the view the data layer applies to every sample (the Protocol of
      selfsup.data.contract);
    - `log_pictures(batch, out)` (optional): pictures for TensorBoard;
    - `teachers() -> [(student, teacher), ...]` (optional): EMA teachers, each a module whose
      parameters have `requires_grad=False` and match its student's one for one; with
      `ema_momentum()` (optional; default: cosine from `method.teacher_momentum` to 1 over the run);
    - `no_weight_decay() -> set[str]` on itself or on any sub-module (optional; timm's convention):
      names or fnmatch patterns, relative to that module, of parameters without weight decay (the
      method's learned tokens; timm's models already list theirs, e.g. a ViT's `pos_embed`, `cls_token`);
    - `skips_weight_decay(name, param, declared)` (optional): overridden only where the method's
      official recipe draws the line elsewhere than the base's rule.

    The base provides:
    - `training_step`: updates the teachers (once per optimizer step, before the step's forward), runs
      `pretext_step`, logs `loss` and every term, trains the online probe on the detached features,
      and calls `log_pictures` every `images_every_n_steps`;
    - `parameter_groups()`: "decay", "no_decay" and "online_probe", a partition of the trainable
      parameters. A parameter gets no weight decay when it has at most one dimension (biases, norm
      weights, layer scales) or when some module's `no_weight_decay()` names it; LAMB and LARS give
      their trust ratio only to the decay group;
    - `configure_optimizers()`: timm's optimizer `optim.name` over those groups, the LR schedule
      (linear warm-up, then cosine) stepped per optimizer step, and gradient clipping at
      `optim.clip_grad` (once: LAMB's own clipping is off);
    - `total_steps` and `warmup_steps`: the schedule's length in optimizer steps (the bound that ends
      the run first: `trainer.max_steps`, or `trainer.max_epochs` times the optimizer steps per
      epoch) and its warm-up, known from `configure_optimizers` on;
    - the weight-decay schedule (`optim.weight_decay_end`), `update_teachers()`, and the checkpoint
      metadata that `submit export` reads (it exports `self.backbone` alone).
    """

    name = "base"

    @classmethod
    def check_config(cls, cfg: DictConfig, backbone) -> None:
        """Raise a UserError for a config this method cannot train, before the run folder is made
        (selfsup/launch/validate.py, before the run folder is made). `backbone` is the run's backbone built on the meta device:
        its geometry (strides, stage sizes, patch grid) without memory. The backbone has already
        said it takes `data.image_size`; a method adds only its own rules."""

    def __init__(self, cfg: DictConfig | dict, num_classes: int | None = None):
        super().__init__()
        self.cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
        self.backbone = create_backbone(self.cfg.backbone.name, **OmegaConf.to_container(self.cfg.backbone.kwargs))
        if self.cfg.backbone.get("channels_last"):
            # oneDNN (CPU) and cuDNN under autocast run NHWC convolutions faster; inputs follow the weights
            self.backbone.to(memory_format=torch.channels_last)
        self.num_classes = num_classes
        self.online_probe = (
            nn.Linear(self.backbone.num_features, num_classes) if self.cfg.method.online_probe and num_classes else None
        )
        self._skipped_counter = None
        self._skipped_shards = None
        self._total_steps = 1
        self._warmup_steps = 0
        self._teachers_updated_at: int | None = None

    # ---- data -------------------------------------------------------------------------------
    def train_view(self) -> TrainView:
        d = self.cfg.data
        kind = self.cfg.method.get("view", "crop_flip")
        if kind == "resized_crop":
            return views.resized_crop_view(d.image_size, d.mean, d.std)
        return views.crop_flip_view(d.image_size, d.mean, d.std)

    # ---- the step (a subclass defines `pretext_step(batch) -> PretextOutput`) ----------------
    def pretext_step(self, batch: dict) -> PretextOutput:
        raise NotImplementedError(f"{type(self).__name__} defines no pretext_step")

    def training_step(self, batch: dict, batch_idx: int):
        batch_size = len(batch["label"])
        if self._teachers_updated_at != self.global_step:  # once per optimizer step (gradient accumulation)
            self._teachers_updated_at = int(self.global_step)
            momentum = self.update_teachers()
            if momentum is not None:
                self.log("train/teacher_momentum", momentum, batch_size=batch_size)
        out = self.pretext_step(batch)
        loss = out["loss"]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        for key, value in out.get("terms", {}).items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"{self.name}: term {key!r} is not a scalar (shape {tuple(value.shape)})")
                value = value.detach().reshape(())
            self.log(f"train/{key}", value, batch_size=batch_size)
        if self.online_probe is not None and "features" in out:
            loss = loss + self._online_probe_step(out["features"].detach(), batch["label"])
        if self._skipped_counter is not None:
            self.log("data/skipped_samples", float(self._skipped_counter.value), batch_size=batch_size)
        if self._skipped_shards is not None:
            self.log("data/skipped_shards", float(self._skipped_shards.value), batch_size=batch_size)
        every = self.cfg.images_every_n_steps
        if every and self.global_step % every == 0 and self.global_rank == 0 and self.logger is not None:
            with torch.no_grad():
                self.log_pictures(batch, out)
        return loss

    def _online_probe_step(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        known = labels >= 0
        if not known.any():
            return features.new_zeros(())
        logits = self.online_probe(features[known])
        loss = F.cross_entropy(logits, labels[known])
        acc = (logits.argmax(1) == labels[known]).float().mean()
        self.log("online_probe/loss", loss.detach(), batch_size=int(known.sum()))
        self.log("online_probe/top1", acc, prog_bar=True, batch_size=int(known.sum()))
        return loss

    def log_pictures(self, batch: dict, out: PretextOutput) -> None:
        """Methods override to add pictures to TensorBoard (`self.logger.experiment`)."""

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self._skipped_counter = getattr(datamodule, "skipped", None)
        self._skipped_shards = getattr(datamodule, "skipped_shards", None)

    # ---- EMA teachers -----------------------------------------------------------------------
    def teachers(self) -> list[tuple[nn.Module, nn.Module]]:
        """(student, teacher) pairs: each teacher is kept as an EMA of its student. None by default."""
        return []

    def ema_momentum(self) -> float:
        """The teachers' EMA momentum at this step: cosine from `method.teacher_momentum` to 1.0 over
        `total_steps` (a method with another schedule overrides this)."""
        return cosine_momentum(int(self.global_step), self.total_steps, float(self.cfg.method.teacher_momentum))

    @torch.no_grad()
    def update_teachers(self) -> float | None:
        """One EMA update of every teacher at `ema_momentum()` (returned; None without teachers)."""
        pairs = self.teachers()
        if not pairs:
            return None
        momentum = self.ema_momentum()
        for student, teacher in pairs:
            ema_update_(teacher, student, momentum)
        return momentum

    # ---- optimisation -----------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Names (or fnmatch patterns) of this module's own parameters without weight decay (timm's
        convention; sub-modules declare theirs with their own `no_weight_decay()`)."""
        return set()

    def declared_no_weight_decay(self) -> set[str]:
        """Full names of the parameters that some module's `no_weight_decay()` names, each name
        prefixed with that module's path."""
        patterns = []
        for path, module in self.named_modules():
            declare = getattr(module, "no_weight_decay", None)
            if callable(declare):
                prefix = f"{path}." if path else ""
                patterns += [prefix + name for name in declare()]
        return {name for name, _ in self.named_parameters() if any(fnmatchcase(name, p) for p in patterns)}

    def skips_weight_decay(self, name: str, param: nn.Parameter, declared: set[str]) -> bool:
        """The parameter-group rule: no weight decay (and, under LAMB and LARS, no trust ratio) for
        parameters of at most one dimension and for those `declared` by a `no_weight_decay()`."""
        return param.ndim <= 1 or name in declared

    def parameter_groups(self) -> list[dict]:
        declared = self.declared_no_weight_decay()
        decay, no_decay, probe = [], [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith("online_probe."):
                probe.append(param)
            elif self.skips_weight_decay(name, param, declared):
                no_decay.append(param)
            else:
                decay.append(param)
        o = self.cfg.optim
        groups = [
            {"params": decay, "weight_decay": o.weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        ]
        if probe:
            groups.append({"params": probe, "weight_decay": 0.0, "lr": self.cfg.method.online_probe_lr, "name": "online_probe"})
        return [g for g in groups if g["params"]]

    def global_batch(self) -> int:
        t = self.trainer
        return self.cfg.data.batch_size * t.world_size * t.accumulate_grad_batches

    def peak_lr(self) -> float:
        o = self.cfg.optim
        return o.lr * self.global_batch() / o.base_batch if o.scale_lr else o.lr

    @property
    def total_steps(self) -> int:
        """Optimizer steps the LR, weight-decay and momentum schedules span: the bound that ends the run
        first. Set by `configure_optimizers` from the trainer (1 before; tools without a trainer may set it)."""
        return self._total_steps

    @total_steps.setter
    def total_steps(self, steps: int) -> None:
        self._total_steps = max(1, int(steps))

    @property
    def warmup_steps(self) -> int:
        """Optimizer steps of the LR warm-up (`optim.warmup_steps`, else `optim.warmup_epochs` epochs)."""
        return self._warmup_steps

    def steps_per_epoch(self) -> int | None:
        """Optimizer steps in one epoch of the training data: its batches per rank (Lightning's count,
        `limit_train_batches` included) over `accumulate_grad_batches`; None for data without a length."""
        t = self.trainer
        if t.train_dataloader is None:
            t.fit_loop.setup_data()
        batches = t.num_training_batches
        if batches == float("inf") or not batches:
            return None
        return max(1, math.ceil(batches / t.accumulate_grad_batches))

    def _schedule_length(self) -> tuple[int, int]:
        """(total optimizer steps, warm-up steps) of this run."""
        o, t = self.cfg.optim, self.trainer
        # max_steps, or max_epochs x steps per epoch, whichever is smaller (Lightning's estimate)
        total = t.estimated_stepping_batches
        if total == float("inf"):
            raise UserError("the run has no length (trainer.max_epochs=-1 and trainer.max_steps=-1): "
                            "set trainer.max_steps, the LR schedule needs one")
        if o.warmup_steps:
            return int(total), int(o.warmup_steps)
        if not o.warmup_epochs:
            return int(total), 0
        per_epoch = self.steps_per_epoch()
        if per_epoch is None:
            raise UserError(f"optim.warmup_epochs={o.warmup_epochs} but the training data has no length: "
                            "set optim.warmup_steps")
        return int(total), int(round(o.warmup_epochs * per_epoch))

    def configure_optimizers(self):
        from timm.optim import create_optimizer_v2

        o = self.cfg.optim
        if o.name in ("sgd", "lars"):
            extra = {"momentum": o.momentum}
        else:
            extra = {"betas": tuple(o.betas), "eps": o.eps}
        if o.name == "lamb":
            extra["max_grad_norm"] = None  # timm's LAMB clips at 1.0 by default: clip once, at optim.clip_grad
        groups = self.parameter_groups()
        if o.name == "lars":
            # the trust ratio of the decay group does not hang on its weight decay being non-zero; the
            # other groups (weight decay 0) get plain momentum SGD
            for g in groups:
                g["always_adapt"] = is_decay_group(g)
        # timm's "sgd" is Nesterov SGD; "momentum" is plain heavy-ball SGD
        opt_name = ("nesterov" if o.nesterov else "momentum") if o.name == "sgd" else o.name
        optimizer = create_optimizer_v2(groups, opt=opt_name, lr=self.peak_lr(), weight_decay=o.weight_decay, **extra)
        total, warmup = self._schedule_length()
        self.total_steps, self._warmup_steps = total, warmup

        def pretext_lambda(step):
            return warmup_cosine(step, total, warmup, o.warmup_start_ratio, o.min_lr_ratio, o.schedule)

        lambdas = [(lambda step: 1.0) if g.get("name") == "online_probe" else pretext_lambda for g in optimizer.param_groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_batch_start(self, batch, batch_idx) -> None:
        o = self.cfg.optim
        if o.weight_decay_end is None:
            return
        wd = cosine_value(o.weight_decay, o.weight_decay_end, self.global_step, self.total_steps)
        optimizer = self.optimizers()
        for group in getattr(optimizer, "optimizer", optimizer).param_groups:
            if is_decay_group(group):
                group["weight_decay"] = wd
        self.log("train/weight_decay", wd)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = self.cfg.optim.clip_grad or gradient_clip_val
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    # ---- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from selfsup.core.config_hash import config_hash

        checkpoint["selfsup"] = {
            "method": self.name,
            "backbone": self.backbone.name,
            "backbone_kwargs": OmegaConf.to_container(self.cfg.backbone.kwargs),
            "timm_name": self.backbone.timm_name,
            "timm_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in self.backbone.timm_kwargs.items()},
            "config_hash": config_hash(self.cfg),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "num_classes": self.num_classes,
        }
