"""The config and folder of a run of `submit pretrain` or `submit continual`, new or resumed: the
two commands differ only in how they compose a config (their `compose`), not in how they resume."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from selfsup.core.errors import UserError
from selfsup.core.run_folder import is_run_folder, load_run_config, new_run_dir
from selfsup.launch.precision import restore_requested_precision

# compose(method, backbone, overrides, base=None): `base`, a saved run config, replaces the file layers
Compose = Callable[..., DictConfig]


def resolve_run(method: str, backbone: str, overrides: list[str], compose: Compose) -> tuple[DictConfig, Path, bool]:
    """(config, run folder, resumed?). `resume=RUN`, or a `run_name` whose folder holds a config.yaml,
    continues that run from its saved config, the other overrides applied on top; anything else is
    a new run in a new folder."""
    resume = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), None)
    rest = [o for o in overrides if not o.startswith("resume=")]
    given = f"resume={resume!r}"
    if resume is None:
        cfg = compose(method, backbone, rest)
        folder = new_run_dir(cfg)
        if not is_run_folder(folder):
            return cfg, folder, False
        resume, given = str(folder), f"run folder {str(folder)!r}"
    base = load_run_config(resume, name=given)
    if (base.method.name, base.backbone.name) != (method, backbone):
        raise UserError(f"{given} is a {base.method.name} {base.backbone.name} run, not {method} {backbone}")
    restore_requested_precision(base)  # `auto` is resolved again on the machine that resumes
    cfg = compose(method, backbone, rest, base=base)
    cfg.resume = resume
    return cfg, Path(resume), True
