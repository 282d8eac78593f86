"""Small Lightning callbacks shared by every run."""

from __future__ import annotations

import time

import lightning.pytorch as pl


class ImagesPerSecond(pl.Callback):
    """Logs training throughput (images per second on this rank, data loading included)."""

    def __init__(self):
        self._last = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._last is None:
            self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        if elapsed > 0:
            pl_module.log("train/images_per_sec", len(batch["label"]) / elapsed, prog_bar=True,
                          batch_size=len(batch["label"]))
