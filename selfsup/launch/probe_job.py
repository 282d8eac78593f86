"""`submit probe RUN ... cluster=slurm nodes=N gpus_per_node=G`: the probe as a Slurm job of N x G
tasks (one per GPU; `cluster.tasks_per_node` for CPU jobs), through the same profile, job shape and
submitit executor as `submit pretrain` (cluster.py, sbatch.py). Every task extracts the features of
its block of shards into a part file in `<run>/probe/` (selfsup/eval/feature_parts.py); task 0
gathers them into the feature cache, fits the probe and writes `probe.json`, as a local probe does.
submitit's folder is `<run>/probe/slurm/` (job scripts, logs, jobs.json).

A job requeued after its time limit or a preemption (submitit's Checkpointable: the same job again)
keeps the parts already written and extracts only the missing ones. `cluster=local` (the default)
runs the probe in this process.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from selfsup.core.errors import UserError
from selfsup.core.overrides import parse_overrides
from selfsup.launch.cluster import apply_profile, slurm_answers, tasks_per_node

try:
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # submitit is a dependency; this only keeps `import` working without it
    _Checkpointable = object  # type: ignore[assignment,misc]


class ProbeJob(_Checkpointable):
    """What each task of a probe job runs: its share of the extraction; task 0 also fits."""

    def __init__(self, target: str, overrides: list[str]):
        self.target = target
        self.overrides = list(overrides)

    def __call__(self) -> dict | None:
        import submitit
        import torch

        from selfsup.eval.feature_parts import RankShare
        from selfsup.eval.probe import run_probe

        env = submitit.JobEnvironment()
        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        attempt = f"{env.job_id}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
        share = RankShare(env.global_rank, env.num_tasks, attempt=attempt)
        print(f"selfsup: probe task {share.rank} of {share.world_size} (attempt {attempt})", flush=True)
        result = run_probe(self.target, self.overrides, share)
        if result is None:
            print(f"selfsup: task {share.rank}: features written; task 0 fits the probe", flush=True)
            return None
        print(result.table(self.target), flush=True)
        return result.record


def requested_cluster(overrides: list[str]) -> str:
    return dict(parse_overrides(overrides)).get("cluster", "local")


def probe_command(target: str, overrides: list[str]) -> int:
    """`submit probe`: here (cluster=local), or as a Slurm job (cluster=slurm; cluster=auto: Slurm
    when a controller answers)."""
    from selfsup.eval.probe import run_probe_command

    cluster = requested_cluster(overrides)
    if cluster == "auto":
        cluster = "slurm" if slurm_answers() else "local"
        print(f"selfsup: cluster=auto -> cluster={cluster}", file=sys.stderr)
        overrides = [*overrides, f"cluster={cluster}"]
    if cluster != "slurm":
        check_local(target, overrides)
        return run_probe_command(target, overrides)
    return submit_probe(target, overrides)


def check_local(target: str, overrides: list[str]) -> None:
    from selfsup.eval.probe import probe_config

    cluster = probe_config(overrides, None).cluster  # the cluster keys alone (data and target checked later)
    shape = {key: int(cluster.get(key) or 1) for key in ("nodes", "gpus_per_node")}
    several = " ".join(f"{key}={value}" for key, value in shape.items() if value > 1)
    if several:
        raise UserError(f"{several}: a local probe runs in one process; extraction on several GPUs or nodes "
                        "needs cluster=slurm")


def submit_probe(target: str, overrides: list[str]) -> int:
    from selfsup.eval.probe import plan_probe

    if not Path(target).exists():
        raise UserError(f"cluster=slurm: probe a run folder (or a .ckpt inside one), not {target!r}: the job's "
                        "tasks gather their features in its probe/ folder")
    plan = plan_probe(target, overrides)  # every refusal before anything is submitted
    run_dir = plan.loaded.run_dir
    if run_dir is None:
        raise UserError(f"cluster=slurm: {target!r} is not in a run folder: probe a run folder (or a .ckpt inside one), "
                        "where the job's tasks gather their features")
    cfg = plan.cfg
    apply_profile(cfg, overrides)
    world_size = int(cfg.cluster.nodes) * tasks_per_node(cfg.cluster)
    if world_size > 1 and not plan.eval_target.splits_by_shard:
        raise UserError(f"the {plan.eval_target.name} eval target reads its data whole: probe it with one task "
                        "(nodes=1 gpus_per_node=1)")
    if not slurm_answers():
        raise UserError("cluster=slurm: no Slurm controller answers `scontrol ping` (is SLURM_CONF set? "
                        "for a local test cluster: bash slurm/local-cluster.sh start)")
    job = _submit(str(Path(target).absolute()), overrides, cfg, Path(run_dir).absolute(), world_size)
    print(f"selfsup: submitted Slurm probe job {job['job_id']} ({job['nodes']} node(s) x {job['tasks_per_node']} "
          f"task(s)); each task extracts its block of the shards, task 0 fits")
    print(f"  results: {Path(run_dir) / plan.eval_target.result_file}")
    print(f"  logs:    {job['stdout']}")
    return 0


def _submit(target: str, overrides: list[str], cfg: DictConfig, run_dir: Path, world_size: int) -> dict:
    from selfsup.launch.run_records import record_job
    from selfsup.launch.sbatch import slurm_executor

    folder = run_dir / "probe" / "slurm"
    cfg.cluster.job_name = cfg.cluster.job_name or f"probe-{run_dir.name}"
    executor = slurm_executor(run_dir, cfg, folder=folder)
    job = executor.submit(ProbeJob(target, overrides))
    record = {"job_id": str(job.job_id), "submitted": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "probe",
              "nodes": int(cfg.cluster.nodes), "tasks_per_node": tasks_per_node(cfg.cluster),
              "gpus_per_node": int(cfg.cluster.gpus_per_node or 0), "world_size": world_size,
              "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}
    record_job(run_dir, record, folder=folder)
    return record
