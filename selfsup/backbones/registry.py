"""The backbone registry: a name -> a constructor of a timm network, wrapped in `Backbone`.

Adding a backbone is one decorated function anywhere in selfsup.backbones; nothing else is edited.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from selfsup.core.errors import unknown_choice


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str  # "convnet" or "vit"
    timm_name: str  # the timm model name whose state_dict layout the weights follow
    build: Callable[..., Any]  # (**overrides) -> timm nn.Module without a classifier
    defaults: dict[str, Any] = field(default_factory=dict)  # overrides baked into the registered name
    description: str = ""


_REGISTRY: dict[str, BackboneSpec] = {}
FAMILIES = ("convnet", "vit")
# the modules that register selfsup's own networks in timm's registry, as `selfsup_<name>`; they
# import timm, so they are imported when a network is built, not with this registry
TIMM_MODEL_MODULES = ("selfsup.backbones.small", "selfsup.backbones.cct")


def register_backbone(name: str, *, family: str, timm_name: str, description: str = "", **defaults):
    """Decorator: register `fn(**overrides) -> timm model` under `name`."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is registered twice")
        _REGISTRY[name] = BackboneSpec(name, family, timm_name, fn, dict(defaults), description)
        return fn

    return wrap


def backbone_names() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    if name not in _REGISTRY:
        raise unknown_choice("backbone", name, _REGISTRY)
    return _REGISTRY[name]


def create_backbone(name: str, **overrides):
    """Build the registered backbone `name`; `overrides` go to the timm constructor
    (e.g. img_size=32, patch_size=4 for a ViT, drop_path_rate=0.1)."""
    from selfsup.backbones.base import Backbone

    spec = get_spec(name)
    kwargs = {**spec.defaults, **{k: v for k, v in overrides.items() if v is not None}}
    net = spec.build(**kwargs)
    return Backbone(net, name=name, family=spec.family, timm_name=spec.timm_name, timm_kwargs=kwargs)


def register_timm_models() -> None:
    """Make every selfsup network known to `timm.create_model` under its `selfsup_*` name."""
    for module in TIMM_MODEL_MODULES:
        importlib.import_module(module)
