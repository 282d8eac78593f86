"""Exponential moving averages of a student: the one update every EMA teacher gets, and the usual
momentum schedule. `SSLMethod.update_teachers` applies them to the (student, teacher) pairs that a
method declares with `teachers()`."""

from __future__ import annotations

import math

import torch
from torch import nn


def cosine_momentum(step: int, total: int, base: float = 0.99) -> float:
    """α(i) = 1 - (1 - base) · ½(1 + cos(π i / total)): `base` at step 0, 1.0 at the end of the schedule."""
    progress = min(1.0, step / max(1, total))
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """θ_t <- momentum · θ_t + (1 - momentum) · θ_s, in place, for parameters only.

    - Buffers are not averaged: a teacher normalises with its own batch statistics and keeps its own
      running ones.
    - Computed as θ_t + (1 - momentum)(θ_s - θ_t) (`lerp_`), so a teacher equal to its student stays
      bit-identical (the first step of a run is a no-op).
    - In the teacher's dtype: a float32 teacher keeps accumulating from a bf16 student (a bf16 EMA at
      momentum 0.996 stops moving, every step's change rounds away).
    - Parameters partitioned by DeepSpeed ZeRO-3 (or FSDP) hold empty shards: refused."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher has {len(t_params)} parameters, student {len(s_params)}")
    for t, s in zip(t_params, s_params, strict=True):
        if hasattr(t, "ds_id") or hasattr(s, "ds_id"):
            raise RuntimeError("EMA of ZeRO-3 partitioned parameters (use deepspeed_stage_2)")
        if t.shape != s.shape:
            raise ValueError(f"teacher parameter {tuple(t.shape)} does not match the student's {tuple(s.shape)}")
        t.lerp_(s.detach().to(t.dtype), 1.0 - momentum)
