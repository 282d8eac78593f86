"""A config's YAML text (what a run folder's config.yaml holds) and its hash (what a checkpoint
records as `config_hash`): the hash of a run's config.yaml, loaded back, is the hash of the config
its checkpoints were trained with."""

from __future__ import annotations

import hashlib

from omegaconf import DictConfig, OmegaConf


def config_hash(cfg: DictConfig) -> str:
    return hashlib.sha1(OmegaConf.to_yaml(cfg, sort_keys=True).encode()).hexdigest()[:12]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
