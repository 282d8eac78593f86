"""ConTraCon's re-weighting of an attention projection (Roy et al., ICCV 2023; docs/methods/contracon.md).

A projection weight `W0 in [D_out, D_in]` (out x in) is seen per head as `[H, D_out/H, D_in]`: head h
owns output rows h*d .. (h+1)*d-1. Each head gets one 1->1 channel k x k convolution (with bias) over
its own `[d, D_in]` block, and a skip gate s_h:

    W_h = Conv_h(W0_h) + sigmoid(s_h) * W0_h

Run as one grouped convolution (groups = H), so a head's kernel never sees another head's rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def reweight(w0: torch.Tensor, kernels: torch.Tensor, bias: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """`w0` [D_out, D_in]; `kernels` [H, 1, k, k]; `bias` [H]; `gate` [H, 1, 1] -> W [D_out, D_in]."""
    heads, k = kernels.shape[0], kernels.shape[-1]
    d_out, d_in = w0.shape
    if d_out % heads:
        raise ValueError(f"{d_out} output rows do not split into {heads} heads")
    per_head = w0.reshape(1, heads, d_out // heads, d_in)
    conv = F.conv2d(per_head, kernels, bias, padding=k // 2, groups=heads)
    return (conv + torch.sigmoid(gate).unsqueeze(0) * per_head).reshape(d_out, d_in)


class HeadConvReweight(nn.Module):
    """The trainable part for one projection: H kernels (PyTorch's default Conv2d init: uniform
    +-1/k for weights and bias) and the gate vector (initialised to 1)."""

    def __init__(self, num_heads: int, kernel_size: int = 15):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"the re-weighting kernel must be odd (same-size output), got {kernel_size}")
        self.kernels = nn.Parameter(torch.empty(num_heads, 1, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(num_heads))
        self.gate = nn.Parameter(torch.ones(num_heads, 1, 1))
        bound = 1.0 / math.sqrt(kernel_size * kernel_size)  # = kaiming_uniform(a=sqrt(5)) of a 1-channel conv
        nn.init.uniform_(self.kernels, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        return reweight(w0, self.kernels, self.bias, self.gate)

    def extra_repr(self) -> str:
        return f"heads={self.kernels.shape[0]}, kernel_size={self.kernels.shape[-1]}"
