"""Why the CPU recipes say `backbone.channels_last=true trainer.precision=auto`: one RotNet training
step (forward, backward, Adam) of a registry convnet in fp32 NCHW (the baseline), fp32 channels-last,
bf16 autocast NCHW and bf16 autocast channels-last, alternated repeat by repeat in one run. Prints
a markdown table with the speed-up over the baseline.

    python benchmarks/cpu_precision.py resnet18_s1 convnet4 --batch 64 --repeats 5

bf16 pays only where the CPU computes it natively (AVX512-BF16 or AMX); `trainer.precision=auto`
checks for that (selfsup/launch/precision.py).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from selfsup.backbones import create_backbone
from selfsup.core.precision import cpu_has_native_bf16

VARIANTS = [("fp32", False, False), ("fp32 channels-last", True, False), ("bf16", False, True),
            ("bf16 channels-last", True, True)]


def make_step(name: str, batch: int, size: int, channels_last: bool, bf16: bool):
    torch.manual_seed(0)
    net = create_backbone(name)
    head = torch.nn.Linear(net.num_features, 4)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], 1e-3)
    x = torch.randn(4 * batch, 3, size, size)  # RotNet: every image in its four rotations
    y = torch.randint(0, 4, (4 * batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(head(net(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("backbones", nargs="+")
    parser.add_argument("--batch", type=int, default=64, help="images per step (x4 rotations)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"native bf16: {cpu_has_native_bf16()}; batch {args.batch} x 4 rotations, {args.size} px")
    print("\n| backbone | variant | s/step (median) | images/s | speed-up |")
    print("|---|---|---:|---:|---:|")
    for name in args.backbones:
        steps = {label: make_step(name, args.batch, args.size, cl, bf16) for label, cl, bf16 in VARIANTS}
        times: dict[str, list[float]] = {label: [] for label in steps}
        for step in steps.values():  # warm-up: oneDNN picks and caches its kernels
            step()
        for _ in range(args.repeats):
            for label, step in steps.items():
                start = time.perf_counter()
                step()
                times[label].append(time.perf_counter() - start)
        base = statistics.median(times["fp32"])
        for label, ts in times.items():
            median = statistics.median(ts)
            print(f"| {name} | {label} | {median:.3f} | {args.batch / median:.1f} | {base / median:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
