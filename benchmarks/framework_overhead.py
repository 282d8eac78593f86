"""What the framework costs per training step: a tiny model's step through selfsup's LightningModule
and Trainer (`build_trainer`: our callbacks, TensorBoard logger, logging of every loss term, LR
schedule stepped per iteration, progress bar) against a bare PyTorch loop doing the same work (the
same module's `pretext_step`, backward, the same optimizer and LR schedule, zero_grad).

Both run in one process on the same in-memory batches and alternate: inside the Lightning run, a
callback stops the clock at window boundaries and runs a window of bare steps (on a second copy of
the module) before Lightning's next window starts. Medians of --repeats windows of --steps steps,
after --warmup steps. Checkpoint writes and TensorBoard pictures are off (I/O the bare loop does
not do; every 200 / 500 steps in a real run). Prints a markdown table.

    python benchmarks/framework_overhead.py                       # RotNet, convnet4, 32 px, batch 64
    python benchmarks/framework_overhead.py --backbone resnet_tiny --batch 32 --repeats 7
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from bench_common import load_average, machine_line, median  # noqa: E402
from selfsup.launch.config import compose  # noqa: E402
from selfsup.launch.precision import apply_precision  # noqa: E402
from selfsup.launch.train import build_trainer  # noqa: E402
from selfsup.ssl import method_class  # noqa: E402


class BareLoop:
    """The same step without the framework: pretext_step, backward, gradient clipping (optim.clip_grad),
    optimizer and scheduler step, on `device` under the config's precision."""

    def __init__(self, cfg, total_steps: int, device: str | torch.device = "cpu"):
        torch.manual_seed(0)
        self.device = torch.device(device)
        self.module = method_class(cfg.method.name)(cfg).to(self.device)
        # configure_optimizers reads the run length and batch geometry from the trainer; give it those alone
        object.__setattr__(self.module, "_trainer", SimpleNamespace(
            estimated_stepping_batches=total_steps, max_epochs=1, max_steps=-1, world_size=1,
            accumulate_grad_batches=1, train_dataloader=(), num_training_batches=total_steps))
        conf = self.module.configure_optimizers()
        object.__setattr__(self.module, "_trainer", None)
        self.optimizer, self.scheduler = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
        self.module.train()
        self.bf16 = cfg.trainer.precision == "bf16-mixed"
        self.clip = cfg.optim.clip_grad

    def step(self, batch: dict) -> None:
        self.module.update_teachers()  # what the base's training_step does first (nothing without teachers)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = self.module.pretext_step(batch)["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        self.scheduler.step()


class Alternate(pl.Callback):
    """Times Lightning's steps in windows and runs a window of bare steps between two of them."""

    def __init__(self, bare: BareLoop, batch: dict, warmup: int, steps: int, repeats: int):
        self.bare, self.batch = bare, batch
        self.warmup, self.steps, self.repeats = warmup, steps, repeats
        self.lightning: list[float] = []
        self.plain: list[float] = []
        self._start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step < self.warmup or (step - self.warmup) % self.steps:
            return
        if self._start is not None:
            self.lightning.append((time.perf_counter() - self._start) / self.steps)
        if len(self.lightning) == self.repeats:
            trainer.should_stop = True
            return
        if not self.plain:  # the bare loop's warm-up
            for _ in range(self.warmup):
                self.bare.step(self.batch)
        start = time.perf_counter()
        for _ in range(self.steps):
            self.bare.step(self.batch)
        self.plain.append((time.perf_counter() - start) / self.steps)
        self._start = time.perf_counter()


class SameBatch:
    """A loader that gives the same in-memory batch `n` times."""

    def __init__(self, batch: dict, n: int):
        self.batch, self.n = batch, n

    def __iter__(self):
        return (self.batch for _ in range(self.n))

    def __len__(self) -> int:
        return self.n


def make_batch(cfg, batch_size: int) -> dict:
    size = cfg.data.image_size
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(batch_size, 3, size, size, generator=g), "label": torch.zeros(batch_size, dtype=torch.long),
            "key": [str(i) for i in range(batch_size)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="rotnet")
    parser.add_argument("--backbone", default="convnet4")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--precision", default="32-true", help="32-true | bf16-mixed | auto")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(machine_line())
    cfg = compose(args.method, args.backbone, [
        "data=digits", f"data.image_size={args.size}", f"data.batch_size={args.batch}", "method.online_probe=false",
        f"trainer.precision={args.precision}", "trainer.accelerator=cpu", "trainer.max_epochs=1",
        "checkpoint_every_n_steps=1000000000", "images_every_n_steps=0"])
    apply_precision(cfg)
    total = args.warmup + args.steps * args.repeats + 1
    cfg.trainer.max_steps = total
    batch = make_batch(cfg, args.batch)
    torch.manual_seed(0)
    module = method_class(args.method)(cfg)
    alternate = Alternate(BareLoop(cfg, total), batch, args.warmup, args.steps, args.repeats)
    with tempfile.TemporaryDirectory(prefix="selfsup-overhead-") as run_dir:
        trainer = build_trainer(cfg, Path(run_dir), extra_callbacks=[alternate], module=module)
        trainer.fit(module, train_dataloaders=SameBatch(batch, total))
    light, bare = median(alternate.lightning), median(alternate.plain)
    print(f"load average at the end: {load_average()}; {args.method} on {args.backbone}, {args.size} px, batch "
          f"{args.batch}, {cfg.trainer.precision}, {torch.get_num_threads()} threads; medians of {len(alternate.lightning)} "
          f"windows of {args.steps} steps")
    print("\n| model | bare loop (ms/step) | selfsup LightningModule + Trainer (ms/step) | overhead (ms/step) | ratio | goal |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| {args.method} {args.backbone} {args.size} px, batch {args.batch} | {bare * 1e3:.1f} | {light * 1e3:.1f} | "
          f"{(light - bare) * 1e3:.1f} | {light / bare:.3f} | <= 1.10 |")


if __name__ == "__main__":
    main()
