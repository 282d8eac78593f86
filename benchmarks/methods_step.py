"""Images/s of one training step of every method in selfsup.ssl.METHODS, at its reference backbone
and 224 px: forward, loss, backward and optimizer step through the method's LightningModule and
selfsup's Trainer (`build_trainer`, trainer.precision=auto), on a batch that went through the
method's own view. A method added to METHODS is picked up: its backbone comes from REFERENCE or,
if it is not listed there, from its family (convnet: resnet50, vit: vit_b at 224 px, patch 16).

"Images" are dataset images per second (one image gives a method all its views: OBoW's teacher
view, 2 crops and 5 patches; RotNet's 4 rotations). Median of --repeats steps after --warmup.

    python benchmarks/methods_step.py                               # every method, batch 8, CPU here
    python benchmarks/methods_step.py --methods spark obow --batch 16 --repeats 5
    python benchmarks/methods_step.py --backbone spark=resnet50     # another backbone for one method
    python benchmarks/methods_step.py --accelerator gpu --batch 64  # on a GPU machine
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from bench_common import BENCH_TMP, load_average, machine_line, make_jpegs, median  # noqa: E402
from selfsup.backbones import get_spec  # noqa: E402
from selfsup.data.stream import collate, decode_image  # noqa: E402
from selfsup.data.views import View  # noqa: E402
from selfsup.launch.config import compose  # noqa: E402
from selfsup.launch.precision import apply_precision  # noqa: E402
from selfsup.launch.train import build_trainer  # noqa: E402
from selfsup.ssl import METHODS, method_class, method_entry  # noqa: E402

# the reference backbone of each method (the papers' ImageNet backbones; TOV-VICReg's is a ViT: its
# config's middle size); other methods get FAMILY_DEFAULT for the first family they accept
REFERENCE = {"rotnet": "resnet50", "obow": "resnet50", "spark": "convnext_b", "tov_vicreg": "vit_s"}
FAMILY_DEFAULT = {"convnet": "resnet50", "vit": "vit_b"}


def synthetic_temporal_batch(batch: int, size: int) -> dict:
    """TOV-VICReg's batch (x, y: two views of o_t; z, w: o_{t-3}, o_{t+3}) as [0, 1] floats; its view
    reads Atari episode chunks, not images, so the frames are random here (the step's cost does not
    depend on pixel values)."""
    g = torch.Generator().manual_seed(0)
    out = {k: torch.rand(batch, 3, size, size, generator=g) for k in ("x", "y", "z", "w")}
    return {**out, "label": torch.full((batch,), -1), "key": [str(i) for i in range(batch)]}


SYNTHETIC = {"tov_vicreg": synthetic_temporal_batch}


class SameBatch:
    def __init__(self, batch: dict, n: int):
        self.batch, self.n = batch, n

    def __iter__(self):
        return (self.batch for _ in range(self.n))

    def __len__(self) -> int:
        return self.n


class StepTimes(pl.Callback):
    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())


def backbone_for(method: str, chosen: dict[str, str]) -> str:
    if method in chosen:
        return chosen[method]
    if method in REFERENCE:
        return REFERENCE[method]
    return FAMILY_DEFAULT[method_entry(method).families[0]]


def method_overrides(method: str, name: str, size: int, batch: int | None, precision: str, accelerator: str) -> list[str]:
    """`key=value`s for timing `method` on backbone `name`: the method's full recipe at `size` px (a ViT
    gets patch 16, or 4 below 112 px), no online probe, checkpoints and pictures off; batch None: the recipe's."""
    overrides = [f"data.image_size={size}", "method.online_probe=false",
                 f"trainer.precision={precision}", f"trainer.accelerator={accelerator}",
                 "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
                 "checkpoint_every_n_steps=1000000000", "images_every_n_steps=0"]
    if batch is not None:
        overrides.append(f"data.batch_size={batch}")
    if get_spec(name).family == "vit":
        overrides += [f"backbone.kwargs.img_size={size}", f"backbone.kwargs.patch_size={16 if size >= 112 else 4}"]
    # the method's full recipe, not its `demo:` settings: name some data (none of it is read here)
    overrides.append("data=atari" if method == "tov_vicreg" else f"data={BENCH_TMP}")
    return overrides


def make_batch(method: str, module, cfg, batch: int, jpegs: list[bytes]) -> dict | None:
    view = module.train_view()
    if isinstance(view, View):
        samples = [{"key": str(i), "label": -1, **view.sample(decode_image(jpegs[i % len(jpegs)]))} for i in range(batch)]
        return view.batch(view.worker_batch(collate(samples)))
    if method in SYNTHETIC:
        return SYNTHETIC[method](batch, cfg.data.image_size)
    return None


def time_method(method: str, name: str, overrides: list[str], args, jpegs: list[bytes]) -> tuple:
    cfg = compose(method, name, overrides)
    apply_precision(cfg)
    steps = args.warmup + args.repeats
    cfg.trainer.max_steps = steps
    torch.manual_seed(0)
    module = method_class(method)(cfg)
    batch = make_batch(method, module, cfg, args.batch, jpegs)
    if batch is None:
        raise RuntimeError("its view is not an image view: add a SYNTHETIC batch for it")
    times = StepTimes()
    with tempfile.TemporaryDirectory(prefix="selfsup-methods-") as run_dir:
        trainer = build_trainer(cfg, Path(run_dir), extra_callbacks=[times], module=module)
        trainer.fit(module, train_dataloaders=SameBatch(batch, steps))
    per_step = [b - a for a, b in zip(times.starts[:-1], times.starts[1:], strict=True)][args.warmup:]
    print(f"  {method} {name}: {', '.join(f'{t:.2f}' for t in per_step)} s/step", flush=True)
    return (method, name, args.size, args.batch, cfg.trainer.precision, trainer.strategy.root_device.type,
            median(per_step))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--backbone", nargs="*", default=[], metavar="METHOD=BACKBONE")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    chosen = dict(item.split("=", 1) for item in args.backbone)
    print(machine_line(), flush=True)
    jpegs = make_jpegs(max(args.batch, 16))
    rows = []
    for method in args.methods:
        name = backbone_for(method, chosen)
        overrides = method_overrides(method, name, args.size, args.batch, args.precision, args.accelerator)
        try:
            rows.append(time_method(method, name, overrides, args, jpegs))
        except Exception as err:  # noqa: BLE001 - one method's failure must not hide the others' figures
            print(f"{method} {name}: failed: {type(err).__name__}: {err}", flush=True)
    print(f"load average at the end: {load_average()}; median of {args.repeats} steps after {args.warmup} warm-up")
    print("\n| method | backbone | px | batch | precision | device | s/step | images/s |")
    print("|---|---|---:|---:|---|---|---:|---:|")
    for method, name, size, batch, precision, device, step in rows:
        print(f"| {method} | {name} | {size} | {batch} | {precision} | {device} | {step:.2f} | {batch / step:.2f} |")


if __name__ == "__main__":
    main()
