"""`trainer.precision=auto`: bf16 autocast wherever the hardware computes bf16 natively, else fp32.

Resolved where the job runs (a Slurm node may differ from the machine that submitted it). On CPUs
with AVX512-BF16 or AMX (Zen 4, Sapphire Rapids and later) oneDNN's bf16 convolutions train a small
ResNet 2-2.5x faster than fp32 (BENCHMARKS.md); elsewhere bf16 is emulated and slower than fp32.
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


# config.yaml holds the precision a run trains with (the value its checkpoints' config_hash
# describes); this key keeps that the user asked for `auto`, so that a resumed run resolves it again
REQUESTED_KEY = "precision_requested"


def apply_precision(cfg) -> bool:
    """Resolve `cfg.trainer.precision` in place; True when it was `auto` (the caller says what it became)."""
    resolved = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    changed = resolved != str(cfg.trainer.precision)
    if changed:
        cfg[REQUESTED_KEY] = str(cfg.trainer.precision)
    cfg.trainer.precision = resolved
    return changed


def resolve_run_precision(cfg) -> bool:
    """`apply_precision` where the run trains, said in one line; True when `auto` was resolved."""
    if not apply_precision(cfg):
        return False
    print(f"selfsup: trainer.precision=auto -> {cfg.trainer.precision} on this machine", flush=True)
    return True


def restore_requested_precision(cfg) -> None:
    """Undo `apply_precision` on a saved run config: back to what the user asked for."""
    requested = cfg.pop(REQUESTED_KEY, None)
    if requested is not None:
        cfg.trainer.precision = requested
