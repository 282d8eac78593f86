"""Checks of a config's values that read the config alone (numbers, choices, the run's length,
devices): each raises one UserError naming the bad value and what would work. Pretraining,
continual and probe configs share them; no torch, no other selfsup layer.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from selfsup.core.errors import UserError, unknown_choice

PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "32", "16", "bf16", "64")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
SCHEDULES = ("cosine", "constant")
DURATION = re.compile(r"(\d+):(\d\d):(\d\d):(\d\d)")  # Lightning's max_time string, DD:HH:MM:SS


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive(v) -> bool:
    return v > 0


def _non_negative(v) -> bool:
    return v >= 0


def _fraction(v) -> bool:
    return 0.0 <= v <= 1.0


def _below_one(v) -> bool:
    return 0.0 <= v < 1.0


# key -> (test, what a value that passes is); None always passes (an optional setting left unset)
NUMBER_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.image_size": (_positive, "a positive number of pixels (the side of the square input images)"),
    "data.batch_size": (_positive, "a positive number of images per device and step"),
    "data.num_workers": (_non_negative, "0 (load in the training process) or more worker processes"),
    "data.prefetch_factor": (_positive, "a positive number of batches each worker prepares ahead"),
    "data.shuffle_buffer": (_non_negative, "0 (no shuffling) or a positive number of samples"),
    "data.epoch_samples": (_positive, "a positive number of samples per epoch, or null for the dataset size"),
    "data.read_timeout": (_positive, "a positive number of seconds a remote shard may send nothing, e.g. 60"),
    "data.read_retries": (_non_negative, "0 (skip a remote shard at its first failure) or more retries"),
    "optim.lr": (_positive, "a positive learning rate, e.g. 1e-3"),
    "optim.base_batch": (_positive, "a positive number of images (the batch that optim.lr is given for)"),
    "optim.weight_decay": (_non_negative, "0 or more"),
    "optim.weight_decay_end": (_non_negative, "0 or more, or null for a constant weight decay"),
    "optim.momentum": (_below_one, "in [0, 1), e.g. 0.9"),
    "optim.eps": (_positive, "a small positive number, e.g. 1e-8"),
    "optim.warmup_steps": (_non_negative, "0 or more steps"),
    "optim.warmup_epochs": (_non_negative, "0 or more epochs"),
    "optim.warmup_start_ratio": (_fraction, "in [0, 1] (the LR at step 0 as a fraction of the peak)"),
    "optim.min_lr_ratio": (_fraction, "in [0, 1] (the final LR as a fraction of the peak)"),
    "optim.clip_grad": (_positive, "a positive gradient norm, or null for no clipping"),
    "trainer.num_nodes": (_positive, "a positive number of nodes"),
    "trainer.accumulate_grad_batches": (_positive, "a positive number of batches per optimizer step"),
    "trainer.log_every_n_steps": (_positive, "a positive number of steps"),
    "checkpoint_every_n_steps": (_positive, "a positive number of steps"),
    "images_every_n_steps": (_non_negative, "0 (no pictures) or a positive number of steps"),
    "probe.batch_size": (_positive, "a positive number of images per forward pass"),
    "probe.train_samples": (_positive, "a positive number of samples, or null for the whole split"),
    "probe.test_samples": (_positive, "a positive number of samples, or null for the whole split"),
    "probe.val_fraction": (lambda v: 0.0 < v < 1.0, "in (0, 1), e.g. 0.1 (carved from the train split)"),
    "probe.max_iter": (_positive, "a positive number of L-BFGS iterations"),
    "probe.select_samples": (_positive, "a positive number of samples"),
    "probe.minibatch.auto_above": (_positive, "a positive size (train samples x feature dim x classes), e.g. 1e10"),
    "probe.minibatch.epochs": (_positive, "a positive number of epochs, e.g. 10"),
    "probe.minibatch.batch_size": (_positive, "a positive number of samples per step, e.g. 4096"),
    "probe.minibatch.momentum": (_below_one, "in [0, 1), e.g. 0.9"),
    "probe.knn_k": (_positive, "a positive number of neighbours, e.g. 20"),
    "probe.knn_temperature": (_positive, "a positive temperature, e.g. 0.07"),
}


# ---- numbers and names ----------------------------------------------------------------------------
def check_numbers(cfg: DictConfig) -> None:
    """The keys of NUMBER_RULES that `cfg` has (pretraining, continual and probe configs share them)."""
    for key, (passes, wanted) in NUMBER_RULES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and not passes(value):
            raise UserError(f"{key}={value!r}: must be {wanted}")
    decays = OmegaConf.select(cfg, "probe.weight_decays")
    if decays is not None and (not decays or not all(_number(d) and _non_negative(d) for d in decays)):
        raise UserError(f"probe.weight_decays={list(decays)}: must be one or more penalties of 0 or more, e.g. [0.0, 1e-4]")
    lrs = OmegaConf.select(cfg, "probe.minibatch.lrs")
    if lrs is not None and (not lrs or not all(_number(v) and _positive(v) for v in lrs)):
        raise UserError(f"probe.minibatch.lrs={list(lrs)}: must be one or more positive learning rates, "
                        "e.g. [0.01, 0.1, 1.0]")
    betas = OmegaConf.select(cfg, "optim.betas")
    if betas is not None and (len(betas) != 2 or not all(_below_one(b) for b in betas)):
        raise UserError(f"optim.betas={list(betas)}: must be two numbers in [0, 1), e.g. [0.9, 0.999]")


def check_choices(cfg: DictConfig) -> None:
    for key, choices in (("optim.schedule", SCHEDULES), ("trainer.precision", PRECISIONS),
                         ("trainer.accelerator", ACCELERATORS)):
        value = str(OmegaConf.select(cfg, key))
        if value not in choices:
            raise unknown_choice(key, value, choices)


# ---- how long the run is --------------------------------------------------------------------------
def duration_seconds(value) -> float | None:
    """`trainer.max_time` in seconds: a DD:HH:MM:SS string or a {days:, hours:, minutes:, seconds:} mapping."""
    if value is None:
        return None
    if isinstance(value, str):
        match = DURATION.fullmatch(value.strip())
        if match:
            days, hours, minutes, seconds = (int(g) for g in match.groups())
            return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)
    elif OmegaConf.is_dict(value) or isinstance(value, dict):
        units = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}
        parts = dict(value)
        if parts and set(parts) <= set(units) and all(isinstance(v, (int, float)) for v in parts.values()):
            return float(sum(units[k] * v for k, v in parts.items()))
    raise UserError(f"trainer.max_time={value!r} is not a duration: write DD:HH:MM:SS, e.g. trainer.max_time=00:00:15:00")


def check_run_length(trainer: DictConfig) -> None:
    """A run needs a step or epoch bound: it ends the run and sizes the LR schedule (a cosine over an
    unknown length cannot be drawn). `max_time` may cut the run earlier, never size it."""
    steps, epochs = trainer.max_steps, trainer.max_epochs
    if steps is None or steps == 0 or steps < -1:
        raise UserError(f"trainer.max_steps={steps}: give a positive number of steps (steps=N), or -1 for no step limit")
    if epochs is not None and (epochs == 0 or epochs < -1):
        raise UserError(f"trainer.max_epochs={epochs}: give a positive number of epochs (epochs=N), or -1 for no epoch limit")
    seconds = duration_seconds(trainer.max_time)
    if seconds is not None and seconds <= 0:
        raise UserError(f"trainer.max_time={trainer.max_time!r}: give a positive duration, e.g. 00:00:15:00")
    if steps == -1 and epochs in (-1, None):
        if seconds is not None:
            raise UserError(f"trainer.max_time={trainer.max_time!r} alone leaves the length of the LR schedule unknown: "
                            "pass steps=N as well (the run stops at whichever comes first)")
        raise UserError("the run has no end: trainer.max_steps=-1, trainer.max_epochs=-1 and no trainer.max_time: "
                        "pass steps=N or epochs=N")


# ---- devices, ranks and the global batch ------------------------------------------------------------
def configured_ranks(trainer: DictConfig) -> int | None:
    """Processes of the run (devices x nodes) when the config fixes them; None when Lightning picks
    at start-up (devices=auto or -1)."""
    devices, nodes = trainer.devices, trainer.num_nodes
    if isinstance(devices, bool) or not isinstance(nodes, int):
        return None
    if isinstance(devices, int):
        return devices * nodes if devices > 0 else None
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        return len(devices) * nodes
    if isinstance(devices, str) and re.fullmatch(r"\d+(,\d+)*,?", devices.strip()):
        return len([d for d in devices.split(",") if d.strip()]) * nodes
    return None


def check_devices(trainer: DictConfig) -> None:
    devices = trainer.devices
    if isinstance(devices, bool) or devices in (0, "0") or (isinstance(devices, int) and devices < -1):
        raise UserError(f"trainer.devices={devices!r}: give a positive number of devices, -1 (all) or auto")
    if isinstance(devices, str) and devices != "auto" and configured_ranks(trainer) is None:
        raise UserError(f"trainer.devices={devices!r}: give a number of devices, a list of device ids, -1 or auto")
