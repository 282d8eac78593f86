"""Where a pretraining job runs, and its shape: this machine (`cluster=local`), a Slurm cluster
through submitit (`cluster=slurm`), or `cluster=auto` (Slurm only when `scontrol ping` says a
controller is UP).

For Slurm, the cluster profile (slurm/profiles/<cluster.profile>.yaml; `cluster.<key>=` overrides
win over it) fills the cluster keys, and the job shape follows: one task per GPU
(`tasks_per_node = gpus_per_node`, or `cluster.tasks_per_node` for CPU jobs), Lightning's
`trainer.num_nodes = nodes` and `trainer.devices = tasks_per_node`. Inside the job each task is one
Lightning process; Lightning's `SLURMEnvironment(auto_requeue=False)` gives it its ranks
(SLURM_PROCID, SLURM_LOCALID, the first node as the rendezvous).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from selfsup.core.errors import UserError, closest
from selfsup.core.overrides import coerce_value, parse_overrides


def profile_dir() -> Path:
    env = os.environ.get("SELFSUP_SLURM_PROFILES")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "slurm" / "profiles"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in profile_dir().glob("*.yaml"))


def slurm_answers(timeout: float = 10.0) -> bool:
    """True when `scontrol ping` reaches a controller that is UP."""
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():  # scontrol would retry reading it for a minute: no Slurm here
        return False
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and " is UP" in out.stdout


def load_profile(name: str) -> dict:
    path = Path(name) if name.endswith((".yaml", ".yml")) else profile_dir() / f"{name}.yaml"
    if not path.exists():
        names = available_profiles()
        near = closest(name, names, n=1)
        hint = f": did you mean {near[0]!r}?" if near else f" (profiles: {', '.join(names) or 'none'})"
        raise UserError(f"unknown Slurm profile cluster.profile={name!r}{hint}")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    if not isinstance(data, dict):
        raise UserError(f"Slurm profile {path} must be a mapping of cluster keys")
    return data


def _user_cluster_keys(overrides: list[str]) -> set[str]:
    return {k.split(".", 1)[1] for k, _ in parse_overrides(overrides) if k.startswith("cluster.")}


def apply_profile(cfg: DictConfig, overrides: list[str]) -> None:
    """Profile values for every cluster key that the command line did not set."""
    profile = load_profile(cfg.cluster.profile)
    user = _user_cluster_keys(overrides)
    for key, value in profile.items():
        if key in ("name", "profile") or key not in cfg.cluster:
            valid = [k for k in cfg.cluster if k not in ("name", "profile")]
            near = closest(str(key), valid, n=1)
            hint = f": did you mean {near[0]!r}?" if near else ""
            raise UserError(f"Slurm profile {cfg.cluster.profile!r}: unknown key {key!r}{hint}")
        if key not in user:
            cfg.cluster[key] = coerce_value(f"cluster.{key}", cfg.cluster[key], value)


def tasks_per_node(cluster: DictConfig) -> int:
    gpus = int(cluster.get("gpus_per_node") or 0)
    tasks = cluster.get("tasks_per_node")
    if gpus > 0:
        if tasks not in (None, gpus):
            raise UserError(f"cluster.tasks_per_node={tasks} with gpus_per_node={gpus}: one task per GPU "
                            "(leave cluster.tasks_per_node unset)")
        return gpus
    return int(tasks or 1)


def prepare_cluster(cfg: DictConfig, overrides: list[str] = (), resumed: bool = False) -> DictConfig:
    """Resolve `cluster=auto`, apply the Slurm profile and derive Lightning's devices and nodes
    from the job shape. Changes `cfg` in place (and returns it): the run's config.yaml records it."""
    overrides = list(overrides)
    if cfg.cluster.name == "auto":
        cfg.cluster.name = "slurm" if slurm_answers() else "local"
        print(f"selfsup: cluster=auto -> cluster={cfg.cluster.name}"
              + (" (a Slurm controller answers)" if cfg.cluster.name == "slurm" else " (no Slurm controller answers)"),
              file=sys.stderr)
    if cfg.cluster.name == "local":
        nodes = int(cfg.cluster.get("nodes") or 1)
        if nodes > 1:
            raise UserError(f"nodes={nodes} needs cluster=slurm (cluster=local runs on this machine only)")
        gpus = cfg.cluster.get("gpus_per_node")
        if gpus:
            cfg.trainer.devices = int(gpus)
            if cfg.trainer.accelerator == "auto":
                cfg.trainer.accelerator = "gpu"
        return cfg
    if cfg.cluster.name != "slurm":
        raise UserError(f"unknown cluster {cfg.cluster.name!r} (local, slurm or auto)")
    if not resumed or "profile" in _user_cluster_keys(overrides):
        apply_profile(cfg, overrides)
    tasks = tasks_per_node(cfg.cluster)
    gpus = int(cfg.cluster.gpus_per_node or 0)
    cfg.trainer.num_nodes = int(cfg.cluster.nodes)
    cfg.trainer.devices = tasks
    if cfg.trainer.accelerator == "auto":
        cfg.trainer.accelerator = "gpu" if gpus else "cpu"
    return cfg
