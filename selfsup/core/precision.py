"""`precision=auto`: bf16 autocast wherever the hardware computes bf16 natively, else fp32.

Resolved where the work runs (a Slurm node may differ from the machine that submitted it). On CPUs
with AVX512-BF16 or AMX (Zen 4, Sapphire Rapids and later) oneDNN's bf16 convolutions train a small
ResNet 2-2.5x faster than fp32 (BENCHMARKS.md); elsewhere bf16 is emulated and slower than fp32.
Training (`trainer.precision`) and probe feature extraction (`probe.precision`) resolve it here.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def native_bf16_in_cpuinfo(cpuinfo: str) -> bool:
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in CPU_BF16_FLAGS)


@cache
def cpu_has_native_bf16() -> bool:
    try:
        return native_bf16_in_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux: no way to tell cheaply, and emulated bf16 would be slower than fp32
        return False


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    if str(precision) != "auto":
        return str(precision)
    import torch

    if str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"
