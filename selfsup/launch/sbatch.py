"""The submitit `SlurmExecutor` of a run, and the sbatch script it submits.

Always submitit's SlurmExecutor, explicitly: its AutoExecutor picks Slurm whenever `srun` is on
PATH. submitit's folder is `<run>/slurm/` (`<jobid>_submission.sh`, `<jobid>_<task>_log.out/.err`,
pickles). `--dry-run` prints the sbatch script that submitit would submit, without submitting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from selfsup.launch.cluster import tasks_per_node
from selfsup.launch.run_records import slurm_folder


def slurm_parameters(cfg: DictConfig) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (sbatch-level names) for this config."""
    c = cfg.cluster
    params: dict[str, Any] = {
        "job_name": c.job_name or f"{cfg.method.name}-{cfg.backbone.name}",
        "time": int(c.time_min),
        "nodes": int(c.nodes),
        "ntasks_per_node": tasks_per_node(c),
        "signal_delay_s": int(c.signal_delay_s),
        # requeue explicitly allowed: submitit's `scontrol requeue` (and Slurm after a node failure)
        "additional_parameters": {"requeue": True, **OmegaConf.to_container(c.sbatch_extra, resolve=True)},
    }
    if c.gpus_per_node:
        params["gpus_per_node"] = int(c.gpus_per_node)
    for key in ("partition", "account", "qos", "constraint", "cpus_per_task"):
        if c.get(key) not in (None, ""):
            params[key] = c[key]
    if c.mem_gb:
        mem = float(c.mem_gb)
        params["mem"] = f"{int(mem)}GB" if mem == int(mem) else f"{int(mem * 1024)}MB"
    if c.setup:
        params["setup"] = list(c.setup)
    if c.srun_args:
        params["srun_args"] = list(c.srun_args)
    return params


def slurm_executor(run_dir: Path, cfg: DictConfig, dry: bool = False, folder: Path | None = None):
    """The executor that submits this run; `dry`: one that also builds where no `srun` is installed
    (submitit refuses to create a SlurmExecutor there), to print the script without submitting.
    `folder`: submitit's folder, when not the run's own `<run>/slurm/` (a probe job's is `<run>/probe/slurm/`)."""
    import submitit

    cls = submitit.SlurmExecutor
    if dry:
        class _DryRunSlurmExecutor(submitit.SlurmExecutor):
            @classmethod
            def affinity(cls) -> int:
                return 1

        cls = _DryRunSlurmExecutor
    executor = cls(folder=folder or slurm_folder(run_dir), max_num_timeout=int(cfg.cluster.max_requeues))
    executor.update_parameters(**slurm_parameters(cfg))
    return executor


def sbatch_script(cfg: DictConfig, run_dir: Path) -> str:
    """The sbatch script that submitit would submit for this run (nothing is written or submitted)."""
    return _submission_text(slurm_executor(run_dir, cfg, dry=True))


def _submission_text(executor) -> str:
    # submitit has no public call that returns the script without submitting it (`submit` writes
    # and sbatch-es it at once); these two private members are what its own `submit` uses, so the
    # printed script is exactly the submitted one. The only use of submitit's private API.
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")
