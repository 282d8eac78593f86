"""SparK's encoder backends side by side: `sparse` (visible sites only) vs `masked` (dense + mask).

For each backbone, times (median of --repeats after --warmup) an encoder forward+backward and a
full SparK step (encoder + densify + decoder + loss + backward), alternating the two backends
repeat by repeat so that both see the same machine load. Prints a markdown table.

    python benchmarks/spark_sparse_vs_masked.py                      # CPU, 2 threads, resnet50 + convnext_b
    python benchmarks/spark_sparse_vs_masked.py --threads 1 --clock cpu   # CPU time: robust on a shared machine
    python benchmarks/spark_sparse_vs_masked.py --conv-engines gather spconv   # both sparse engines
    python benchmarks/spark_sparse_vs_masked.py --device cuda --batch 32

On a machine shared with other jobs, wall-clock times of 2 threads suffer from preemption (a
parallel region waits for its slowest thread), and the sparse backend, which runs many more small
ops, suffers more; `--threads 1 --clock cpu` measures the CPU time of one thread instead.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from selfsup.backbones import create_backbone
from selfsup.ssl.spark import Densify, LightDecoder, SparseEncoder, densify_norm_for, random_visible_mask, spark_loss
from selfsup.ssl.spark.sparse_encoder import CONV_ENGINES, spconv_or_reason

GOALS = {"resnet50": 0.6, "convnext_b": 0.7}  # sparse / masked, encoder forward+backward, CPU


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device) -> str:
    spconv, reason = spconv_or_reason()
    spconv_text = f"spconv {__import__('spconv').__version__}" if spconv else f"no spconv ({reason})"
    parts = [f"CPU {cpu_model()} ({os.cpu_count()} cores)", f"torch {torch.__version__}", spconv_text]
    if device.type == "cuda":
        parts.insert(0, f"GPU {torch.cuda.get_device_name(device)}")
    else:
        parts.append(f"{torch.get_num_threads()} threads")
    return ", ".join(parts)


class Workload:
    """One backbone at one input size: the same images, mask and modules for every variant
    ("masked", and "sparse/<engine>" for each conv engine)."""

    def __init__(self, name: str, args, device: torch.device):
        generator = torch.Generator().manual_seed(0)
        self.backbone = create_backbone(name).to(device)
        stride = self.backbone.total_stride
        grid = args.pixels // stride
        self.images = torch.randn(args.batch, 3, args.pixels, args.pixels, generator=generator).to(device)
        self.active = random_visible_mask(args.batch, grid, grid, args.ratio, generator=generator).to(device)
        self.encoders = {"masked": SparseEncoder(self.backbone, "masked")}
        for engine in args.conv_engines:
            self.encoders[f"sparse/{engine}"] = SparseEncoder(self.backbone, "sparse", engine)
        self.densify = Densify(self.backbone.stage_channels, args.width, densify_norm_for(self.backbone)).to(device)
        self.decoder = LightDecoder(stride, args.width).to(device)
        self.device = device

    def encoder_step(self, variant: str) -> None:
        stages = self.encoders[variant](self.images, self.active)
        sum(s.mean() for s in stages).backward()

    def full_step(self, variant: str) -> None:
        stages = self.encoders[variant](self.images, self.active)
        reconstruction = self.decoder(self.densify(stages, self.active))
        spark_loss(reconstruction, self.images, self.active, self.backbone.total_stride).backward()

    def seconds(self, step, variant: str, clock) -> float:
        for module in (self.backbone, self.densify, self.decoder):
            module.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = clock()
        step(variant)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return clock() - start


def measure(workload: Workload, step, repeats: int, warmup: int, clock) -> dict[str, list[float]]:
    times = {variant: [] for variant in workload.encoders}
    for i in range(warmup + repeats):
        for variant in times:  # alternate, so that load changes hit every variant alike
            elapsed = workload.seconds(step, variant, clock)
            if i >= warmup:
                times[variant].append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "convnext_b"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--pixels", type=int, default=224)
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--width", type=int, default=768, help="decoder width (the paper's 768)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--repeats", type=int, default=9, help="more on a machine shared with other jobs")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--conv-engines", nargs="+", default=["gather"], choices=CONV_ENGINES, help="sparse variants to time"
    )
    parser.add_argument("--steps", nargs="+", default=["encoder", "full"], choices=["encoder", "full"])
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: CPU time of one thread")
    args = parser.parse_args()
    if args.clock == "cpu" and (args.threads != 1 or args.device != "cpu"):
        parser.error("--clock cpu measures one thread's CPU time: use it with --threads 1 on the CPU")
    clock = time.perf_counter if args.clock == "wall" else time.thread_time

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = []
    for name in args.models:
        workload = Workload(name, args, device)
        # name the engine that ran (spconv falls back to gather where it cannot run)
        labels = {
            v: f"sparse, {e.conv_engine_for(device)} engine" if v != "masked" else "masked"
            for v, e in workload.encoders.items()
        }
        steps = {"encoder": ("encoder fwd+bwd", workload.encoder_step), "full": ("full step", workload.full_step)}
        for what, step in (steps[s] for s in args.steps):
            times = measure(workload, step, args.repeats, args.warmup, clock)
            rows.append((name, what, {labels[v]: statistics.median(t) for v, t in times.items()}))
            spread = "  ".join(f"{labels[v]} {min(t):.3f}/{statistics.median(t):.3f}/{max(t):.3f}s" for v, t in times.items())
            print(f"{name} {what} (min/median/max): {spread}", flush=True)
        del workload
    load_after = os.getloadavg()[0]

    print()
    print(
        f"Machine: {machine_description(device)}. Batch {args.batch}, {args.pixels} px, mask ratio {args.ratio}, "
        f"decoder width {args.width}; {'wall-clock' if args.clock == 'wall' else 'CPU'} time, median of "
        f"{args.repeats} after {args.warmup} warm-up, variants alternated. "
        f"Load average (1 min) {load_before:.1f} before, {load_after:.1f} after."
    )
    print()
    sparse_labels = [label for label in rows[0][2] if label != "masked"]
    header = "| backbone | measured | masked (s) | " + " | ".join(f"{l} (s) | / masked" for l in sparse_labels)
    print(header + " | goal |")
    print("|---|---|---:|" + "---:|---:|" * len(sparse_labels) + "---:|")
    for name, what, times in rows:
        goal = GOALS.get(name) if what == "encoder fwd+bwd" and device.type == "cpu" else None
        cells = " | ".join(f"{times[l]:.3f} | {times[l] / times['masked']:.2f}" for l in sparse_labels)
        print(f"| {name} | {what} | {times['masked']:.3f} | {cells} | {f'<= {goal}' if goal else ''} |")


if __name__ == "__main__":
    main()
