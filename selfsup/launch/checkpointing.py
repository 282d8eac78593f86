"""Checkpoints that survive kills: written atomically (selfsup/core/atomic.py), so
`last.ckpt` is always either the previous complete checkpoint or the new complete one. A DeepSpeed
checkpoint is a folder (one shard per rank): it is written as `last.ckpt.tmp/` by every rank and
renamed into place by rank 0 after a barrier (the previous one is moved to `last.ckpt.old/` first and
removed after, and `resolve_last` falls back to it if a kill came between the two renames).
Next to it, `last.json` (step, epoch, time) lets `submit status` and the resume seeding read where
a run stands without loading the checkpoint.

`CheckpointOnSignal` turns a signal into a checkpoint at the next training step on every rank, then
an action: SIGTERM (what Slurm sends on preemption and `scancel`, and `kill` sends) ends the fit
(`end_after_checkpoint`); under submitit, USR2 requeues the job (the design is in slurm_job.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
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


class SignalFlag:
    """A signal handler that only records the signal, for a training-step boundary to act on. SIGTERM
    outranks the others (the job is going away), whichever came first."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:
        if self.signum is None or signum == signal.SIGTERM:
            self.signum = signum


class CheckpointOnSignal(pl.Callback):
    """At the first training-batch end after a signal of `actions` reached any rank, every rank saves
    `last.ckpt` at that same step, then `actions[signal](trainer, signal)` runs. The signal number is
    max-reduced over the ranks every step (one scalar all-reduce), so the ranks agree on the step, and
    on the signal (SIGTERM, the larger number, outranks USR2), even when it reaches them at different
    times. The last callback of the Trainer: the others have seen the step it saves."""

    def __init__(self, actions: dict[int, Callable[[pl.Trainer, int], None]], flag: SignalFlag | None = None):
        self.actions = actions
        self.flag = flag or SignalFlag()

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning installs its own SIGTERM handler when fit starts; it would end fit at the next batch
        # without a checkpoint (and under DDP run a collective inside the handler). This one replaces it;
        # Lightning puts back the handlers from before fit when fit ends. A SIGTERM that came before
        # this point set Lightning's flag, read below.
        if threading.current_thread() is threading.main_thread():
            for signum in self.actions:
                signal.signal(signum, self.flag)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        asked = self.flag.signum or (signal.SIGTERM if trainer.received_sigterm else 0)
        if trainer.world_size > 1:
            local = torch.tensor(int(asked), device=trainer.strategy.root_device)
            asked = int(trainer.strategy.reduce(local, reduce_op="max"))
        if not asked:
            return
        last = next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
        if last is None:
            raise RuntimeError("CheckpointOnSignal needs the LastCheckpoint callback")
        last.save_now(trainer)
        self.actions[asked](trainer, asked)


def end_after_checkpoint(trainer: pl.Trainer, signum: int) -> None:
    """The action for SIGTERM: say where the run stands, and end the fit (Lightning's SIGTERMException,
    which `run_pretrain` turns into a result)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    ranks = f" [rank {trainer.global_rank} of {trainer.world_size}]" if trainer.world_size > 1 else ""
    run = Path(trainer.default_root_dir)
    print(f"selfsup: {signal.Signals(signum).name} received: checkpoint saved at step {trainer.global_step} "
          f"(epoch {trainer.current_epoch}){ranks}; exiting (continue with resume={run})", flush=True)
    raise SIGTERMException(128 + signum)
