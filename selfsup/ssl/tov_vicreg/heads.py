"""The expander (VICReg's projector) and the temporal-order head."""

from __future__ import annotations

import torch
from torch import nn

from selfsup.ssl.tov_vicreg.loss import permute_triplets


def expander(in_dim: int, dims: list[int] | tuple[int, ...] = (1024, 1024, 1024)) -> nn.Sequential:
    """in -> 1024 -> 1024 -> 1024: (Linear + BN1d + ReLU) for every layer but the last, which is a
    Linear without bias."""
    layers: list[nn.Module] = []
    prev = in_dim
    for i, dim in enumerate(dims):
        last = i == len(dims) - 1
        layers.append(nn.Linear(prev, dim, bias=not last))
        if not last:
            layers += [nn.BatchNorm1d(dim), nn.ReLU(inplace=True)]
        prev = dim
    return nn.Sequential(*layers)


class TemporalOrderHead(nn.Module):
    """Concatenate the (permuted) representations of (current, previous, next): [B, 3D] -> one logit."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(3 * dim, 1)

    def forward(self, current: torch.Tensor, previous: torch.Tensor, following: torch.Tensor,
                perms: torch.Tensor) -> torch.Tensor:
        stack = torch.stack([current, previous, following], dim=1)
        return self.linear(permute_triplets(stack, perms).flatten(1)).squeeze(1)
