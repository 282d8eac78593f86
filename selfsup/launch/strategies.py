"""`strategy=` -> a Lightning strategy."""

from __future__ import annotations

from omegaconf import DictConfig


def build_strategy(cfg: DictConfig):
    name = cfg.strategy.name
    if name == "auto":
        return "auto"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=cfg.strategy.get("find_unused_parameters", False))
    return name
