"""A backbone built on the meta device: its geometry (stage sizes, patch grid) without memory or
weights, for checking a config before anything runs."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from selfsup.core.errors import UserError


def meta_backbone(cfg: DictConfig, kwargs: dict | None = None):
    """The run's backbone on the meta device (built with `kwargs`, default backbone.kwargs): its
    geometry without memory or weights."""
    import torch

    from selfsup.backbones.registry import create_backbone

    if kwargs is None:
        kwargs = OmegaConf.to_container(cfg.backbone.kwargs, resolve=True)
    try:
        with torch.device("meta"):
            return create_backbone(cfg.backbone.name, **kwargs).eval()
    except TypeError as err:  # a constructor argument the network does not have
        raise UserError(f"backbone.kwargs {kwargs} do not fit {cfg.backbone.name}: {err}") from None
