"""Small Lightning callbacks shared by every run."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf


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


class RunTally(pl.Callback):
    """What this fit did: optimizer steps taken, images seen (all ranks) and the seconds from its
    first batch to its last, for the line that ends a run."""

    def __init__(self):
        self.first_step: int | None = None
        self.last_step = 0
        self.batches = 0
        self.images = 0
        self._started: float | None = None
        self.train_seconds = 0.0

    @property
    def steps(self) -> int:
        return 0 if self.first_step is None else self.last_step - self.first_step

    @property
    def reached_first_step(self) -> bool:
        return self.batches > 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._started is None:
            self._started = time.perf_counter()
            self.first_step = self.last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.last_step = trainer.global_step
        self.batches += 1
        self.images += _batch_images(batch) * trainer.world_size
        self.train_seconds = time.perf_counter() - self._started

    def images_per_second(self) -> float:
        return self.images / self.train_seconds if self.train_seconds > 0 else 0.0


class EpochWithoutData(pl.Callback):
    """Ends a run (a UserError) at an epoch that gave no batch while its data failed: samples that
    could not be decoded or shards that could not be read (a server out of reach for good). An
    endless stream would otherwise try its shards again every epoch, for ever where only
    max_steps bounds the run. The datamodule's shared counters (selfsup/data/stream.py) say what failed."""

    def __init__(self):
        self._batches = 0
        self._failed_before = 0

    @staticmethod
    def failed(trainer) -> tuple[int, int]:
        datamodule = getattr(trainer, "datamodule", None)
        counters = (getattr(datamodule, "skipped", None), getattr(datamodule, "skipped_shards", None))
        return tuple(int(c.value) if c is not None else 0 for c in counters)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._batches = 0
        self._failed_before = sum(self.failed(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        samples, shards = self.failed(trainer)
        if self._batches == 0 and samples + shards > self._failed_before:
            from selfsup.core.errors import UserError

            resume = f"; once the data can be read, resume={trainer.default_root_dir}" if trainer.global_step else ""
            raise UserError(f"epoch {trainer.current_epoch} gave no batch: {shards} shards could not be read and "
                            f"{samples} samples could not be decoded so far (the warnings above say why){resume}")


def _batch_images(batch) -> int:
    return len(batch["label"]) if isinstance(batch, dict) else len(batch[-1])


class SampleKeyLog(pl.Callback):
    """`data.log_keys=true`: the `__key__` of every sample trained on, one JSON line per batch
    (`{"epoch", "batch", "step", "keys"}`, step = the global step after it) appended to
    `<folder>/rank<R>.jsonl` and flushed at every step, so that what a run trained on, and in which
    order, can be read back. A resumed run appends; a step written twice (a run killed without a
    checkpoint at its last step takes the steps after its checkpoint again) counts as its later line."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._file = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._file = open(self.folder / f"rank{trainer.global_rank}.jsonl", "a", encoding="utf-8")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        keys = batch.get("key") if isinstance(batch, dict) else None
        if self._file is None or keys is None:
            return
        line = {"epoch": trainer.current_epoch, "batch": batch_idx, "step": trainer.global_step, "keys": list(keys)}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_key_log(path: Path) -> dict[int, dict]:
    """The lines of a `SampleKeyLog` file by step, the later line of a step that was written twice
    (an unfinished last line, from a kill in the middle of a write, is left out)."""
    lines = {}
    for text in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            continue
        lines[line["step"]] = line
    return dict(sorted(lines.items()))


class RunProgressBar(TQDMProgressBar):
    """One bar for the whole run, on stderr, that counts to where the run really ends.

    Lightning's own bar restarts every epoch and counts that epoch's batches, so a run bounded by
    max_steps showed e.g. 150/3750. This bar counts optimizer steps (batches, for a module that
    steps its optimizers itself) up to Lightning's own plan, the smaller of max_steps and
    max_epochs x steps per epoch, starting at the step a resumed run starts from. A max_time that
    may end the run sooner is shown as the time left of the budget; tqdm's estimate stays the
    one for the step count."""

    def __init__(self, description: str | None = None, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self.description = description

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(desc=self.description or "training", position=2 * self.process_position, disable=self.is_disabled,
                    leave=True, dynamic_ncols=True, file=sys.stderr, smoothing=0, bar_format=self.BAR_FORMAT)

    def init_validation_tqdm(self) -> Tqdm:
        """Lightning's validation bar, on stderr beside the training bar (Lightning writes to stdout)."""
        has_main_bar = self.trainer.state.fn != "validate"
        return Tqdm(desc=self.validation_description, position=2 * self.process_position + has_main_bar,
                    disable=self.is_disabled, leave=not has_main_bar, dynamic_ncols=True, file=sys.stderr,
                    bar_format=self.BAR_FORMAT)

    def on_train_start(self, trainer, *_) -> None:
        self.train_progress_bar = bar = self.init_train_tqdm()
        bar.reset(total=planned_total(trainer))
        bar.initial = bar.n = progress_done(trainer)  # a resumed run starts where it stopped; tqdm's rate counts from here

    def on_train_epoch_start(self, trainer, *_) -> None:
        epoch = f"epoch {trainer.current_epoch}"
        self.train_progress_bar.set_description(f"{self.description}, {epoch}" if self.description else epoch.capitalize())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        done = progress_done(trainer)
        if bar is not None and self._should_update(done, bar.total):
            bar.n = done
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer, pl_module) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        left = time_budget_left(trainer)
        if left is not None:
            metrics["time left"] = format_seconds(max(0.0, left))
        return metrics


def planned_total(trainer: pl.Trainer) -> int | None:
    """Where the run ends by its step and epoch bounds, in the unit of `progress_done`: Lightning's
    own plan (the one the LR schedule is sized by); None when only max_time bounds it."""
    total = convert_inf(trainer.estimated_stepping_batches)
    return None if total is None else int(total)


def progress_done(trainer: pl.Trainer) -> int:
    """Optimizer steps done, or batches for a module with manual optimisation (its global step
    counts each of its optimizers' steps, and Lightning plans it in batches)."""
    if trainer.lightning_module.automatic_optimization:
        return trainer.global_step
    return trainer.fit_loop.epoch_loop.total_batch_idx + 1


def time_budget_left(trainer: pl.Trainer) -> float | None:
    """Seconds left of trainer.max_time, or None without one."""
    from lightning.pytorch.callbacks import Timer

    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    return timer.time_remaining() if timer is not None else None


def format_seconds(seconds: float) -> str:
    """H:MM:SS (M:SS under an hour), as tqdm writes times."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
