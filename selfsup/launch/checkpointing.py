"""Checkpoints that survive kills: written atomically (selfsup/core/atomic.py), so
`last.ckpt` is always either the previous complete checkpoint or the new complete one. A DeepSpeed
checkpoint is a folder (one shard per rank): it is written as `last.ckpt.tmp/` by every rank and
renamed into place by rank 0 after a barrier (the previous one is moved to `last.ckpt.old/` first and
removed after, and `resolve_last` falls back to it if a kill came between the two renames).
Next to it, `last.json` (step, epoch, time) lets `submit status` and the resume seeding read where
a run stands without loading the checkpoint.

`RequeueOnSignal` is the Lightning half of Slurm preemption (the design is in slurm_job.py)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from selfsup.core.atomic import fsync_folder, write_atomic, write_text_atomic

LAST = "last.ckpt"
LAST_INFO = "last.json"


def resolve_last(folder: Path) -> Path | None:
    """The last complete checkpoint in `folder` (a file, or a DeepSpeed folder), or None."""
    last = Path(folder) / LAST
    if last.exists():
        return last
    old = Path(folder) / (LAST + ".old")
    return old if old.is_dir() else None


def read_last_info(folder: Path) -> dict | None:
    path = Path(folder) / LAST_INFO
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_info(folder: Path, trainer: pl.Trainer) -> None:
    info = {"global_step": trainer.global_step, "epoch": trainer.current_epoch,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_text_atomic(Path(folder) / LAST_INFO, json.dumps(info) + "\n")


def _is_deepspeed(trainer: pl.Trainer) -> bool:
    return type(trainer.strategy).__name__ == "DeepSpeedStrategy"


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        write_atomic(path, lambda temporary: torch.save(checkpoint, temporary))


class LastCheckpoint(pl.Callback):
    """Saves `checkpoints/last.ckpt` every N optimizer steps, at the end of fit, and when fit is
    interrupted (Ctrl-C / an exception), so a rerun with `resume=` continues from there."""

    def __init__(self, folder: Path, every_n_steps: int):
        self.path = Path(folder) / LAST
        self.every_n_steps = every_n_steps
        self._saved_step = -1

    def _save(self, trainer: pl.Trainer) -> None:
        # before the first step there is nothing trained to keep (and a folder of a run that never
        # started is removed by `submit pretrain`)
        if trainer.global_step not in (self._saved_step, 0):
            if _is_deepspeed(trainer):
                self._save_folder(trainer)
            else:
                trainer.save_checkpoint(self.path, weights_only=False)
            if trainer.is_global_zero:
                _write_info(self.path.parent, trainer)
            self._saved_step = trainer.global_step

    def save_now(self, trainer: pl.Trainer) -> None:
        """Save at this step on every rank (a collective: all ranks must call it)."""
        self._save(trainer)

    def _save_folder(self, trainer: pl.Trainer) -> None:
        tmp, old = self.path.with_name(LAST + ".tmp"), self.path.with_name(LAST + ".old")
        if trainer.is_global_zero and tmp.exists():
            shutil.rmtree(tmp)
        trainer.strategy.barrier("selfsup.last_ckpt.clean")
        trainer.save_checkpoint(tmp, weights_only=False)  # every rank writes its shard
        trainer.strategy.barrier("selfsup.last_ckpt.saved")
        if trainer.is_global_zero:
            if self.path.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(self.path, old)
            os.replace(tmp, self.path)
            fsync_folder(self.path.parent)
            shutil.rmtree(old, ignore_errors=True)
        trainer.strategy.barrier("selfsup.last_ckpt.renamed")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.world_size == 1 and trainer.global_step > 0:
            self._save(trainer)
            print(f"\nselfsup: interrupted; checkpoint saved to {self.path} (resume with resume={self.path.parent.parent})")


class RequeueOnSignal(pl.Callback):
    """At the first training-batch end after `flag` is set (by a signal handler) on any rank, every
    rank saves `last.ckpt` at that same step, then `hand_over(trainer)` runs (under submitit: rank 0
    requeues the job and exits). The flag is OR-reduced over ranks every step (one scalar
    all-reduce), so the ranks agree on the step even when the signal reaches them at different times."""

    def __init__(self, flag, hand_over: Callable[[pl.Trainer], None]):
        self.flag = flag
        self.hand_over = hand_over

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.flag.is_set(), all=False):
            return
        last = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
        if last is None:
            raise RuntimeError("RequeueOnSignal needs the LastCheckpoint callback")
        last.save_now(trainer)
        self.hand_over(trainer)
