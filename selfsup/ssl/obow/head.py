"""OBoW's dynamic BoW prediction head: a weight generator turns the current vocabulary into the
classifier weights of the student's bag-of-words prediction (docs/methods/obow.md, step 7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightGenerator(nn.Module):
    """L2-normalised words [K, C_l] -> Linear(C_l, 2 C_s, no bias) -> BatchNorm1d over the K words ->
    ReLU -> Linear(2 C_s, C_s) -> L2-normalised rows: the prediction weights W_l [K, C_s]."""

    def __init__(self, word_channels: int, feature_channels: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or 2 * feature_channels
        self.net = nn.Sequential(
            nn.Linear(word_channels, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, feature_channels),
        )

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(F.normalize(words, dim=1)), dim=1)


def bow_logits(features: torch.Tensor, weights: torch.Tensor, kappa: float) -> torch.Tensor:
    """z = κ f Wᵀ with un-normalised student features f [N, C_s] and unit-norm rows W [K, C_s]."""
    return kappa * features @ weights.t()
