"""A run's folder: `<run_dir>/<run_name>`, by default `runs/<method>-<backbone>-<time>`, holding the
run's `config.yaml` (the resolved config, whose hash its checkpoints record), its checkpoints and
its TensorBoard logs."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from selfsup.core.atomic import write_text_atomic
from selfsup.core.config_hash import to_yaml
from selfsup.core.errors import UserError

CONFIG_FILE = "config.yaml"


def new_run_dir(cfg: DictConfig) -> Path:
    name = cfg.run_name or f"{cfg.method.name}-{cfg.backbone.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.run_dir) / name


def is_run_folder(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_FILE).exists()


def load_run_config(folder: str | Path, name: str | None = None) -> DictConfig:
    """The saved config of run folder `folder`; `name` says how the user gave it (e.g. `resume=...`)."""
    if not is_run_folder(folder):
        raise UserError(f"{name or repr(str(folder))} is not a run folder (no {CONFIG_FILE} in it)")
    return OmegaConf.load(Path(folder) / CONFIG_FILE)  # type: ignore[return-value]


def write_run_config(run_dir: str | Path, cfg: DictConfig) -> Path:
    """Create the run folder (if need be) and write its config.yaml."""
    return write_text_atomic(Path(run_dir) / CONFIG_FILE, to_yaml(cfg))
