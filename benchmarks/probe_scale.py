"""The linear probe at ImageNet's shape: wall time of the mini-batch solver (every (penalty, lr)
pair in one batched layer) against the same work done one pair at a time, and against full-batch
L-BFGS (selfsup.eval.linear), on synthetic features.

The features: 2048-d, 1000 classes, each class a Gaussian around its own mean (means drawn with
standard deviation `--signal`, unit noise), stored as bf16 (fp32 with --tiny), a test split of 50
per class as ImageNet's validation set. Sizes: 10 % of ImageNet-1k's train split (128,000) and all
of it (1,281,167) by default.

    python benchmarks/probe_scale.py --device cpu --sizes 128000 --steps 3 --lbfgs-iters 2
    python benchmarks/probe_scale.py --device cuda --sizes 128000 1281167       # whole probes on a GPU
    python benchmarks/probe_scale.py --tiny                                      # every path, in seconds

`--steps N` times N optimiser steps of each fit (`--repeats` times, batched and single alternated,
medians) and extrapolates to the configured epochs (a whole probe takes hours on a small CPU); `--steps 0` runs the whole probe (sweep, refit of the chosen
pair, test) and, for the baseline, every pair's whole fit one after another. `--lbfgs-iters N` times
N L-BFGS iterations on the whole train split and on the sweep's 20,000 samples and extrapolates to
probe.max_iter iterations per fit (an upper bound: L-BFGS may meet its tolerance sooner). Times are
wall-clock seconds; where other jobs share the cores, the CPU seconds of this process (divided by
its threads) are printed beside them.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import machine_line  # noqa: E402

from selfsup.eval.linear import DEFAULT_WEIGHT_DECAYS, split_train_val, topk_accuracy, train_linear  # noqa: E402
from selfsup.eval.minibatch import (DEFAULT_LRS, MinibatchSettings, feature_source, feature_stats,  # noqa: E402
                                    minibatch_probe, train_pairs)

IMAGENET_TRAIN = 1_281_167


def synthetic(samples: int, dim: int, classes: int, signal: float, seed: int, dtype: torch.dtype,
              chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """`samples` features around class-dependent Gaussian means (the means are the same for every
    seed), written chunk by chunk into `dtype` (a bf16 matrix at ImageNet's size is never float32 whole)."""
    means = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234)) * signal
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (samples,), generator=g)
    x = torch.empty(samples, dim, dtype=dtype)
    for start in range(0, samples, chunk):
        part = y[start:start + chunk]
        x[start:start + len(part)] = means[part] + torch.randn(len(part), dim, generator=g)
    return x, y


class Timer:
    """Wall and process-CPU seconds of a block (the device synchronised at both ends)."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        self._sync()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.wall = time.perf_counter() - self.wall
        self.cpu = (time.process_time() - self.cpu) / torch.get_num_threads()

    def _sync(self):
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize()


def timed_steps(x, y, classes, grids: list, settings, rows, source, stats, steps: int, repeats: int) -> list:
    """(wall, CPU) seconds per optimiser step of a fit of each grid of pairs in `grids`: one warm-up
    step each, then `repeats` fits of `steps` steps, the grids alternated repeat by repeat (so a
    change in the machine's load falls on all of them), medians. The feature statistics (one pass
    over the rows per fit) are given, not timed."""
    def fit(grid, n):
        wds, lrs = [wd for wd, _ in grid], [lr for _, lr in grid]
        train_pairs(x, y, classes, wds, lrs, settings, rows=rows, source=source, stats=stats, max_steps=n)

    for grid in grids:
        fit(grid, 1)
    times = [[] for _ in grids]
    for _ in range(repeats):
        for grid, kept in zip(grids, times):
            with Timer(settings.device) as t:
                fit(grid, steps)
            kept.append((t.wall / steps, t.cpu / steps))
    return [(statistics.median(w for w, _ in kept), statistics.median(c for _, c in kept)) for kept in times]


def lbfgs_seconds_per_iteration(x, y, classes, iters: int, device: str) -> tuple[float, float]:
    xf = x.float().to(device)
    with Timer(device) as t:
        train_linear(xf, y.to(device), classes, weight_decay=1e-4, max_iter=iters)
    return t.wall / iters, t.cpu / iters


def row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def hours(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def measure_size(n: int, args, emit) -> None:
    dtype = torch.float32 if args.tiny else torch.bfloat16
    bf16 = args.autocast == "bf16"
    settings = MinibatchSettings(epochs=args.epochs, batch_size=args.batch_size, lrs=tuple(args.lrs),
                                 autocast=torch.bfloat16 if bf16 else None, device=args.device)
    grid = [(wd, lr) for wd in args.weight_decays for lr in args.lrs]
    start = time.perf_counter()
    x, y = synthetic(n, args.dim, args.classes, args.signal, 0, dtype)
    made = time.perf_counter() - start
    print(f"# {n} x {args.dim} {str(dtype).removeprefix('torch.')} features made in {made:.0f} s", file=sys.stderr, flush=True)
    fit_rows, _ = split_train_val(n, args.val_fraction, args.seed)
    sweep_steps = args.epochs * math.ceil(len(fit_rows) / args.batch_size)
    refit_steps = args.epochs * math.ceil(n / args.batch_size)
    label = f"{n:,} x {args.dim} x {args.classes}"
    pairs = len(grid)
    if args.steps:
        source = feature_source(x, args.device)
        stats = feature_stats(x, fit_rows)
        (batched, batched_cpu), (single, single_cpu) = timed_steps(
            x, y, args.classes, [grid, grid[:1]], settings, fit_rows, source, stats, args.steps, args.repeats)
        all_at_once = batched * sweep_steps + single * refit_steps
        one_by_one = single * sweep_steps * pairs + single * refit_steps
        timed = f"{args.repeats} x {args.steps} steps timed"
        emit(row([label, args.device, f"all {pairs} pairs at once", timed,
                  f"{batched:.3g} s ({batched_cpu:.3g} CPU)", f"{hours(all_at_once)} (extrapolated)", "-"]))
        emit(row([label, args.device, "one pair at a time", timed,
                  f"{single:.3g} s ({single_cpu:.3g} CPU)", f"{hours(one_by_one)} (extrapolated)",
                  f"{one_by_one / all_at_once:.1f}x the batched time"]))
    else:
        test_samples = n // 4 if args.tiny else 50 * args.classes  # ImageNet's validation set: 50 a class
        xt, yt = synthetic(test_samples, args.dim, args.classes, args.signal, 1, dtype)
        with Timer(args.device) as t:
            result = minibatch_probe(x, y, xt, yt, args.classes, settings=settings,
                                     weight_decays=tuple(args.weight_decays), val_fraction=args.val_fraction,
                                     seed=args.seed)
        chosen = f"top-1 {result['top1']:.2f}, wd={result['chosen']['weight_decay']:g} lr={result['chosen']['lr']:g}"
        batched = t.wall
        emit(row([label, args.device, f"all {pairs} pairs at once", "whole probe", "-",
                  f"{hours(t.wall)} ({hours(t.cpu)} CPU)", chosen]))
        source = feature_source(x, args.device)
        with Timer(args.device) as t:
            for wd, lr in grid:
                train_pairs(x, y, args.classes, [wd], [lr], settings, rows=fit_rows, source=source)
            train_pairs(x, y, args.classes, [grid[0][0]], [grid[0][1]], settings, source=source)
        emit(row([label, args.device, "one pair at a time", "every fit", "-",
                  f"{hours(t.wall)} ({hours(t.cpu)} CPU)", f"{t.wall / batched:.1f}x the batched time"]))
    limit = args.lbfgs_max_samples or (n if torch.device(args.device).type == "cuda" else 200_000)
    if args.lbfgs_iters and n <= limit:
        per_iter, per_iter_cpu = lbfgs_seconds_per_iteration(x, y, args.classes, args.lbfgs_iters, args.device)
        select = min(args.select_samples, len(fit_rows))
        sweep_iter, _ = lbfgs_seconds_per_iteration(x[fit_rows[:select]], y[fit_rows[:select]], args.classes,
                                                    args.lbfgs_iters, args.device)
        probe = args.max_iter * (per_iter + len(args.weight_decays) * sweep_iter)
        emit(row([label, args.device, f"L-BFGS ({len(args.weight_decays)} penalties on {select:,}, refit on all)",
                  f"{args.lbfgs_iters} iterations timed", f"{per_iter:.3g} s ({per_iter_cpu:.3g} CPU)",
                  f"up to {hours(probe)} (extrapolated to {args.max_iter} iterations a fit)", "-"]))
    del x, y


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[IMAGENET_TRAIN // 10, IMAGENET_TRAIN],
                        help="train samples (default: 10%% of ImageNet-1k's train split, and all of it)")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--signal", type=float, default=0.14, help="standard deviation of the class means")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--autocast", choices=("bf16", "fp32"), default="bf16", help="the matrix products' dtype")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS))
    parser.add_argument("--weight-decays", type=float, nargs="+", default=list(DEFAULT_WEIGHT_DECAYS))
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps timed per fit (0: whole fits)")
    parser.add_argument("--repeats", type=int, default=3, help="timed fits of --steps steps each (median)")
    parser.add_argument("--lbfgs-iters", type=int, default=2, help="L-BFGS iterations timed (0: no L-BFGS)")
    parser.add_argument("--lbfgs-max-samples", type=int,
                        help="L-BFGS only up to this many samples (its float32 copies and logits must fit in "
                             "memory; default 200,000 on a CPU, any number on a GPU)")
    parser.add_argument("--max-iter", type=int, default=1000, help="probe.max_iter, for the L-BFGS extrapolation")
    parser.add_argument("--select-samples", type=int, default=20000, help="probe.select_samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tiny", action="store_true", help="a check of every path in seconds: 2,000 x 32 x 10")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    if args.tiny:
        args.sizes, args.dim, args.classes, args.signal = [2000], 32, 10, 1.0
        args.batch_size, args.epochs, args.select_samples, args.repeats = 256, 2, 500, 2
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = []

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    emit(f"Machine: {machine_line()}; {args.threads} threads")
    emit(f"\n{args.epochs} epochs at batch {args.batch_size}, {len(args.weight_decays)} penalties x "
         f"{len(args.lrs)} learning rates, matrix products in {args.autocast}\n")
    emit(row(["train samples x dim x classes", "device", "solver", "measured", "per step / iteration",
              "whole probe", "note"]))
    emit("|---|---|---|---|---:|---:|---|")
    for n in args.sizes:
        measure_size(n, args, emit)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
