"""The shared base of every method: backbone from the registry, optimizer parameter groups, per-step
LR (and optional weight-decay) schedules, logging of every loss term, the optional online linear
probe, and the checkpoint metadata that `submit export` reads. A method implements `pretext_step`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from selfsup.backbones import create_backbone
from selfsup.data import views

# parameters never decayed besides 1-D ones (norms, biases): learned tokens and layer-scale
NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "mask_token", "dist_token", "gamma", "rot_token",
                  "sit_token")


def warmup_cosine(step: int, total: int, warmup: int, start_ratio: float, min_ratio: float, schedule: str) -> float:
    """LR multiplier at `step`: linear warm-up from `start_ratio`, then cosine (or flat) to `min_ratio`."""
    if warmup > 0 and step < warmup:
        return start_ratio + (1.0 - start_ratio) * step / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_value(start: float, end: float, step: int, total: int) -> float:
    progress = min(1.0, step / max(1, total))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class SSLMethod(pl.LightningModule):
    """Subclasses set `name` and implement `pretext_step(batch) -> dict` whose "loss" is optimised,
    whose other scalar entries are logged as loss terms, and whose optional "features" (pooled
    embeddings of the un-augmented-by-the-pretext images) feed the online probe."""

    name = "base"

    @classmethod
    def check_config(cls, cfg: DictConfig, backbone) -> None:
        """Raise a UserError for a config this method cannot train, before the run folder is made
        (selfsup/launch/validate.py). `backbone` is the run's backbone built on the meta device:
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

    # ---- data -------------------------------------------------------------------------------
    def train_view(self) -> Callable:
        d = self.cfg.data
        kind = self.cfg.method.get("view", "crop_flip")
        if kind == "resized_crop":
            return views.resized_crop_view(d.image_size, d.mean, d.std)
        return views.crop_flip_view(d.image_size, d.mean, d.std)

    # ---- the step (a subclass defines `pretext_step(batch) -> dict`) --------------------------
    def training_step(self, batch: dict, batch_idx: int):
        out = self.pretext_step(batch)
        loss = out["loss"]
        batch_size = len(batch["label"])
        for key, value in out.items():
            if key != "features" and isinstance(value, torch.Tensor) and value.ndim == 0:
                self.log(f"train/{key}", value.detach(), prog_bar=key == "loss", batch_size=batch_size)
        if self.online_probe is not None and "features" in out:
            loss = loss + self._online_probe_step(out["features"].detach(), batch["label"])
        if self._skipped_counter is not None:
            self.log("data/skipped_samples", float(self._skipped_counter.value), batch_size=batch_size)
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

    def log_pictures(self, batch: dict, out: dict) -> None:
        """Methods override to add pictures to TensorBoard (`self.logger.experiment`)."""

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        self._skipped_counter = getattr(datamodule, "skipped", None)

    # ---- optimisation -----------------------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        decay, no_decay, probe = [], [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith("online_probe."):
                probe.append(param)
            elif param.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES:
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

    def configure_optimizers(self):
        from timm.optim import create_optimizer_v2

        o = self.cfg.optim
        if o.name in ("sgd", "lars"):
            extra = {"momentum": o.momentum}
        else:
            extra = {"betas": tuple(o.betas), "eps": o.eps}
        # timm's "sgd" is Nesterov SGD; "momentum" is plain heavy-ball SGD
        opt_name = ("nesterov" if o.nesterov else "momentum") if o.name == "sgd" else o.name
        optimizer = create_optimizer_v2(self.parameter_groups(), opt=opt_name, lr=self.peak_lr(),
                                        weight_decay=o.weight_decay, **extra)
        total = int(self.trainer.estimated_stepping_batches)
        steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1)) if self.trainer.max_epochs else total
        warmup = int(o.warmup_steps or round(o.warmup_epochs * steps_per_epoch))
        self._schedule_total = total

        def pretext_lambda(step):
            return warmup_cosine(step, total, warmup, o.warmup_start_ratio, o.min_lr_ratio, o.schedule)

        lambdas = [(lambda step: 1.0) if g.get("name") == "online_probe" else pretext_lambda for g in optimizer.param_groups]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_batch_start(self, batch, batch_idx) -> None:
        o = self.cfg.optim
        if o.weight_decay_end is None:
            return
        wd = cosine_value(o.weight_decay, o.weight_decay_end, self.global_step, getattr(self, "_schedule_total", 1))
        optimizer = self.optimizers()
        for group in getattr(optimizer, "optimizer", optimizer).param_groups:
            if group.get("name") == "decay":
                group["weight_decay"] = wd
        self.log("train/weight_decay", wd)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = self.cfg.optim.clip_grad or gradient_clip_val
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    # ---- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from selfsup.launch.config import config_hash

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
