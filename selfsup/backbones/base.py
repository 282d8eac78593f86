"""`Backbone`: the one face every registered network shows to the methods."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Backbone(nn.Module):
    """A timm network without classifier, held as `self.net` so that `net.state_dict()` keeps
    timm's key names (the export strips exactly the `backbone.net.` prefix).

    - `forward(x)` -> pooled embedding `[B, num_features]`
    - `forward_features(x)` -> last feature map `[B, C, h, w]` (convnet) or tokens `[B, N, D]` (vit)
    - convnets: `forward_stages(x)` -> list of stage outputs; `stage_channels`, `stage_strides`
    """

    def __init__(self, net: nn.Module, *, name: str, family: str, timm_name: str, timm_kwargs: dict[str, Any]):
        super().__init__()
        self.net = net
        self.name = name
        self.family = family
        self.timm_name = timm_name
        self.timm_kwargs = dict(timm_kwargs)
        self.num_features = int(net.num_features)
        if family == "convnet":
            stages = [f for f in net.feature_info if f["module"].startswith(("layer", "stages"))]
            self.stage_indices = [net.feature_info.index(f) for f in stages]
            self.stage_channels = [int(f["num_chs"]) for f in stages]
            self.stage_strides = [int(f["reduction"]) for f in stages]
            self.total_stride = self.stage_strides[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(features, pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.family != "convnet":
            raise TypeError(f"{self.name} is a {self.family}: only convnets have stages")
        return self.net.forward_intermediates(x, indices=self.stage_indices, intermediates_only=True)

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        return self.net.state_dict()

    def extra_repr(self) -> str:
        return f"name={self.name}, family={self.family}, num_features={self.num_features}"
