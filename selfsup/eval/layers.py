"""`probe.layers`: which layers of a backbone `submit probe` reads, and the module that pools them all
in one forward pass.

A layer is a convnet stage or a ViT block, named as the backbone names them (`stage1`.., `block1`..,
selfsup.backbones.base.Backbone.layer_names), by timm's module name (`layer2`, `stages.1`,
`blocks.5`), or by its 1-based position; `all` is every one. Unset (the default), the probe reads the
final pooled features only.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import OmegaConf

from selfsup.core.errors import UserError

ALL = "all"


def requested_layers(cfg) -> Any:
    """`probe.layers` as plain Python (None when unset)."""
    value = OmegaConf.select(cfg, "probe.layers")
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def resolve_layers(value: Any, backbone) -> list[int] | None:
    """The 0-based, ascending positions in `backbone.layer_names()` that `value` (probe.layers) names;
    None for None. Anything else: a UserError naming the value and the layers there are."""
    if value is None:
        return None
    names, modules = backbone.layer_names(), backbone.layer_modules()
    valid = (f"1..{len(names)} ({names[0]}..{names[-1]}, or timm's {modules[0]}..{modules[-1]}), "
             f"a list of them, or {ALL}")
    items = value if isinstance(value, list) else [value]
    if not items:
        raise UserError(f"probe.layers=[]: name at least one layer of {backbone.name}: {valid}")
    if items == [ALL]:
        return list(range(len(names)))
    positions = set()
    for item in items:
        position = _position(item, names, modules)
        if position is None:
            raise UserError(f"probe.layers={show_layers(value)}: {backbone.name} has no layer {item!r}; use {valid}")
        positions.add(position)
    return sorted(positions)


def _position(item: Any, names: list[str], modules: list[str]) -> int | None:
    if isinstance(item, bool):
        return None
    if isinstance(item, int):
        return item - 1 if 1 <= item <= len(names) else None
    if isinstance(item, str):
        for table in (names, modules):
            if item in table:
                return table.index(item)
    return None


def show_layers(value: Any) -> str:
    return "[" + ",".join(str(v) for v in value) + "]" if isinstance(value, list) else str(value)


class LayerFeatures(torch.nn.Module):
    """`{layer name: pooled features [B, D]}` of the chosen layers and the last one (the final pooled
    features, which the probe's headline numbers are), from one pass through the backbone."""

    def __init__(self, backbone, positions: list[int]):
        super().__init__()
        self.backbone = backbone
        names = backbone.layer_names()
        self.positions = sorted(set(positions) | {len(names) - 1})
        self.names = [names[p] for p in self.positions]
        self.final = names[-1]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.backbone.forward_layers(x, self.positions)))


def layer_features(features: dict, name: str) -> dict:
    """The `{split: {group: (x, labels)}}` of one layer, from features extracted by LayerFeatures."""
    return {split: {group: (x[name], labels) for group, (x, labels) in groups.items()}
            for split, groups in features.items()}
