"""Checkpoints that survive kills: written to a temporary file and renamed into place, so
`last.ckpt` is always either the previous complete checkpoint or the new complete one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class LastCheckpoint(pl.Callback):
    """Saves `checkpoints/last.ckpt` every N optimizer steps, at the end of fit, and when fit is
    interrupted (Ctrl-C / an exception), so a rerun with `resume=` continues from there."""

    def __init__(self, folder: Path, every_n_steps: int):
        self.path = Path(folder) / LAST
        self.every_n_steps = every_n_steps
        self._saved_step = -1

    def _save(self, trainer: pl.Trainer) -> None:
        if trainer.global_step != self._saved_step:
            trainer.save_checkpoint(self.path, weights_only=False)
            self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.world_size == 1:
            self._save(trainer)
            print(f"\nselfsup: interrupted; checkpoint saved to {self.path} (resume with resume={self.path.parent.parent})")
