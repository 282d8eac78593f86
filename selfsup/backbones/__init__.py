"""Shared backbone registry. `create_backbone(name, **overrides) -> Backbone`.

Importing this package registers every name but imports neither torch nor timm; they are imported
when a backbone is built.
"""

from selfsup.backbones import zoo as _zoo  # noqa: F401  (registers the names)
from selfsup.backbones.registry import (
    BackboneSpec,
    backbone_names,
    create_backbone,
    get_spec,
    register_backbone,
    register_timm_models,
)

__all__ = ["BackboneSpec", "backbone_names", "create_backbone", "get_spec", "register_backbone", "register_timm_models"]
