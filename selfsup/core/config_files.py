"""The config files: configs/<group>/<name>.yaml (or $SELFSUP_CONFIGS), loaded with OmegaConf."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from selfsup.core.errors import unknown_choice


def config_root() -> Path:
    env = os.environ.get("SELFSUP_CONFIGS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "configs"


def available(group: str) -> list[str]:
    return sorted(p.stem for p in (config_root() / group).glob("*.yaml"))


def load_config(path: Path) -> DictConfig:
    return OmegaConf.load(path)  # type: ignore[return-value]


def select_data(cfg: DictConfig, value: str) -> DictConfig:
    """`data=NAME` picks configs/data/NAME.yaml; `data=<path or pattern>` streams those shards."""
    names = available("data")
    if value in names:
        return OmegaConf.merge(cfg, load_config(config_root() / "data" / f"{value}.yaml"))
    if any(c in value for c in "/{*.:") or Path(value).exists():
        return OmegaConf.merge(cfg, {"data": {"name": "shards", "train": value}})
    raise unknown_choice("data (a built-in dataset, or a shard path/pattern)", value, names)
