"""The training input pipeline against the limit of its own work, side by side in one run.

For each method's view at 224 px (SparK's single RandomResizedCrop view, OBoW's multi-crop), with
the batch size and the DataLoader workers its config uses, samples/s of:

- pipeline: selfsup's full training input: shards on disk -> webdataset (shard split, shuffle
  buffer) -> decode -> the method's view -> uint8 batches in the workers -> the main process, which
  runs the view's batch stage (uint8 -> normalised floats) — exactly what the training step
  receives. With gpu_augment=on the flips and colour augmentations run batched: on the GPU if
  there is one, else (as here) in the workers on each batch, as a CPU-only training run does;
- (a) bare loop: the same JPEG bytes from memory, the same decode and the same view stages (per
  image, then per batch), split over the same number of processes: the limit of the work itself;
- (b) decode alone, over the same processes: the floor under any pipeline on these cores; the
  "decode share" is the fraction of the pipeline's time per image that decoding would take;
- (c) torchvision ImageFolder + DataLoader over the same images as files, same workers, batch size
  and transforms, written the usual way: PIL decode, the view's torchvision.transforms.v2 chain on
  PIL images, ToImage/ToDtype/Normalize per image.

Variants are measured in turn within each repeat (so all see the same machine load); each loader
is started fresh, run past its start-up and prefetch queue, timed over --batches batches (whole
rounds of the workers), and shut down before the next one runs. Medians of --repeats. Prints a
markdown table.

    python benchmarks/data_pipeline.py                                  # spark + obow, gpu_augment off and on
    python benchmarks/data_pipeline.py --methods spark --repeats 5
    python benchmarks/data_pipeline.py --methods spark --images 256 --batches 3 --repeats 1   # a quick check
    python benchmarks/data_pipeline.py --clock cpu     # CPU seconds of all processes: robust on a shared machine

The JPEGs: benchmarks/bench_common.py (cut from the photographs scikit-learn ships), written once
under /tmp/selfsup-bench.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from bench_common import Clock, cpu_count, load_average, machine_line, median, photo_dataset  # noqa: E402
from selfsup.data.stream import ShardDataModule, collate, decode_image  # noqa: E402
from selfsup.data.views import Photometric, View, to_float  # noqa: E402
from selfsup.launch.config import compose  # noqa: E402
from selfsup.ssl import method_class  # noqa: E402

REFERENCE_BACKBONE = {"spark": "convnext_b", "obow": "resnet50", "rotnet": "resnet50"}


def method_setup(method: str, shards: Path, overrides: list[str]):
    """The composed config of `submit pretrain METHOD <reference backbone> data=<shards>` and the
    method's training view (built without building the network)."""
    cfg = compose(method, REFERENCE_BACKBONE.get(method, "resnet50"),
                  [f"data={shards}", "data.epoch_samples=1000000000", *overrides])
    view = method_class(method).train_view(SimpleNamespace(cfg=cfg))
    if not isinstance(view, View):
        raise SystemExit(f"{method}'s view is not an image view (benchmark it on its own data)")
    return cfg, view


# ---- (a) and (b): plain processes over JPEG bytes in memory ---------------------------------------
_WORK: dict = {}


def _init_process() -> None:
    torch.set_num_threads(1)  # as in a DataLoader worker


def _bare(task: tuple[int, int]) -> int:
    start, count = task
    jpegs, view, batch_size = _WORK["jpegs"], _WORK["view"], _WORK["batch_size"]
    done = 0
    while done < count:
        n = min(batch_size, count - done)
        samples = [{"key": "", "label": -1, **view.sample(decode_image(jpegs[(start + done + i) % len(jpegs)]))}
                   for i in range(n)]
        view.batch(view.worker_batch(collate(samples)))
        done += n
    return done


def _decode(task: tuple[int, int]) -> int:
    start, count = task
    jpegs = _WORK["jpegs"]
    for i in range(count):
        decode_image(jpegs[(start + i) % len(jpegs)])
    return count


CLOCK = Clock("wall")


def time_processes(pool, fn, processes: int, samples: int, offset: int) -> float:
    share = -(-samples // processes)
    tasks = [(offset + k * share, share) for k in range(processes)]
    start = CLOCK.now()
    done = sum(pool.map(fn, tasks, chunksize=1))
    return done / (CLOCK.now() - start)


# ---- the pipeline and (c) -------------------------------------------------------------------
def time_loader(make_iter, finish, warmup: int, batches: int) -> float:
    """Samples/s of a fresh loader over `batches` batches after `warmup` ones, then shut it down."""
    it, closer = make_iter()
    try:
        for _ in range(warmup):
            finish(next(it))
        n = 0
        start = CLOCK.now()
        for _ in range(batches):
            n += len(finish(next(it))["label"])
        return n / (CLOCK.now() - start)
    finally:
        closer()
        gc.collect()


def loader_rounds(workers: int, prefetch: int, batches: int) -> tuple[int, int]:
    """(warm-up batches, timed batches) of a loader measurement: past the workers' start-up and
    prefetch queue, then about `batches`. Each worker makes whole batches and the workers start
    together, so batches arrive in rounds of `workers`: both counts are whole rounds (a window ending
    mid-round would count part of a round's batches for all of its time)."""
    if not workers:
        return 2, batches
    return max(2, workers * (prefetch + 1)), max(1, round(batches / workers)) * workers


def pipeline_iter(cfg, view: View, gpu_augment: bool):
    data_cfg = cfg.data.copy()
    data_cfg.gpu_augment = gpu_augment
    dm = ShardDataModule(data_cfg, train_view=view, seed=0)
    loader = dm.train_dataloader()
    it = iter(loader)

    def close():
        nonlocal it, loader
        loader.close()  # ends the workers of the epoch left unfinished (selfsup/data/epoch_stream.py)
        del it, loader

    return it, close, dm


def finish_batch(dm: ShardDataModule, batch: dict, device: torch.device) -> dict:
    """What the training step receives: the batch moved to `device` (as Lightning moves it), then the
    view's batch stage there (with gpu_augment on a GPU, the batched augmentations); waits for the GPU."""
    batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    batch = dm.on_after_batch_transfer(batch, 0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch


def torchvision_photometric(p: Photometric | None) -> list:
    """The photometric part as the stock torchvision.transforms.v2 transforms."""
    if p is None:
        return []
    return [*([v2.RandomApply([v2.ColorJitter(*p.jitter_strength)], p=p.jitter)] if p.jitter else []),
            *([v2.RandomGrayscale(p.gray)] if p.gray else []),
            *([v2.RandomApply([v2.GaussianBlur(p.blur_kernel, sigma=p.blur_sigma)], p=p.blur)] if p.blur else []),
            *([v2.RandomHorizontalFlip(p.flip)] if p.flip else [])]


class ClassicTransform:
    """The view as the usual per-image chain of stock torchvision transforms on PIL images
    (geometry, photometric, ToImage/ToDtype/Normalize)."""

    def __init__(self, view: View):
        self.parts = {}
        for name, b in view.branches.items():
            chain = [b.geometry, *torchvision_photometric(b.photometric), *to_float(view.mean, view.std)]
            self.parts[name] = (v2.Compose(chain), b.copies, b.after)

    def __call__(self, image) -> dict:
        out = {}
        for name, (chain, copies, after) in self.parts.items():
            x = torch.stack([chain(image) for _ in range(copies)]) if copies else chain(image)
            out[name] = after(x) if after is not None else x
        return out


def imagefolder_iter(folder: Path, view: View, batch_size: int, workers: int, prefetch: int):
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(folder), transform=ClassicTransform(view))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                        prefetch_factor=prefetch if workers else None)
    state = {"it": iter(loader)}

    def endless():
        while True:
            try:
                sample, target = next(state["it"])
            except StopIteration:  # an epoch ended: a new one (what a training loop does)
                state["it"] = iter(loader)
                continue
            yield {**sample, "label": target}

    def close():
        state["it"]._shutdown_workers()
        state.clear()

    return endless(), close


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["spark", "obow"])
    parser.add_argument("--gpu-augment", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--images", type=int, default=2048, help="JPEGs in the benchmark set")
    parser.add_argument("--batches", type=int, default=24,
                        help="timed batches per measurement (rounded to whole rounds of the workers)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=None, help="default: the method config's data.num_workers")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: CPU seconds of all the processes / cores (robust on a shared machine; hides idle waits)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.batch_size=32")
    args = parser.parse_args()

    CLOCK.kind = args.clock
    print(machine_line() + ("" if args.clock == "wall" else "; clock: CPU time of all processes / cores"))
    overrides = list(args.overrides) + ([f"data.num_workers={args.workers}"] if args.workers is not None else [])
    rows = []
    for method in args.methods:
        d = method_setup(method, Path("/tmp"), overrides)[0].data  # the shard count follows the workers

        workers, batch_size, prefetch = d.num_workers, d.batch_size, d.get("prefetch_factor") or 2
        shards, folder, jpegs = photo_dataset(args.images, max(16, workers))
        cfg, view = method_setup(method, shards, overrides)
        d = cfg.data
        warmup, timed = loader_rounds(workers, prefetch, args.batches)
        samples = timed * batch_size
        print(f"{method}: {workers} workers, batch {batch_size}, {d.image_size} px, warm-up {warmup} batches, "
              f"timed {timed} batches; {len(jpegs)} JPEGs, {sum(map(len, jpegs)) / len(jpegs) / 1024:.0f} KB "
              f"mean", flush=True)
        times: dict[str, list[float]] = {}
        processes = max(1, workers)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for r in range(args.repeats):
            for mode in args.gpu_augment:
                on = mode == "on"
                used = view.with_gpu_augment(on, in_workers=on and not torch.cuda.is_available())
                it, close, dm = pipeline_iter(cfg, view, on)
                finish = lambda b, dm=dm: finish_batch(dm, b, device)  # noqa: E731
                times.setdefault(f"pipeline/{mode}", []).append(
                    time_loader(lambda it=it, close=close: (it, close), finish, warmup, timed))
                _WORK.update(jpegs=jpegs, view=used, batch_size=batch_size)
                with mp.get_context("fork").Pool(processes, initializer=_init_process) as pool:
                    pool.map(_bare, [(0, 2)] * processes)  # warm-up: imports, first calls
                    times.setdefault(f"bare/{mode}", []).append(
                        time_processes(pool, _bare, processes, samples, offset=r * samples))
                    if mode == args.gpu_augment[0]:
                        times.setdefault("decode", []).append(
                            time_processes(pool, _decode, processes, samples, offset=r * samples))
            times.setdefault("imagefolder", []).append(
                time_loader(lambda: imagefolder_iter(folder, view, batch_size, workers, prefetch), lambda b: b,
                            warmup, timed))
            print(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in times.items()),
                  flush=True)
        med = {k: median(v) for k, v in times.items()}
        for mode in args.gpu_augment:
            rows.append((method, mode, workers, batch_size, med[f"pipeline/{mode}"], med[f"bare/{mode}"],
                         med["decode"], med["imagefolder"]))
    print(f"\nload average at the end: {load_average()}; medians of {args.repeats}; samples/s; {cpu_count()} cores")
    print("\n| view | gpu_augment | workers | batch | pipeline | (a) bare loop | pipeline / (a) | (b) decode alone | "
          "decode share | (c) ImageFolder | pipeline / (c) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method, mode, workers, batch, pipe, bare, dec, folder in rows:
        print(f"| {method} | {mode} | {workers} | {batch} | {pipe:.0f} | {bare:.0f} | {pipe / bare:.2f} | {dec:.0f} | "
              f"{pipe / dec:.0%} | {folder:.0f} | {pipe / folder:.2f} |")
    print("\ngoals: pipeline / (a) >= 0.9, pipeline / (c) >= 1.0; decode share = pipeline rate / decode rate "
          "(the part of each image's time that is decoding)")


if __name__ == "__main__":
    main()
