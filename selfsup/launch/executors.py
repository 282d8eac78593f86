"""Where a pretraining job runs: this machine (`cluster=local`) or a Slurm cluster through submitit
(`cluster=slurm`), and `cluster=auto` (Slurm only when `scontrol ping` says a controller is UP).

Slurm launch
------------
`submit pretrain ... cluster=slurm` composes the config, applies the cluster profile
(slurm/profiles/<cluster.profile>.yaml; `cluster.<key>=` overrides win over it), derives the job
shape — one task per GPU (`tasks_per_node = gpus_per_node`, or `cluster.tasks_per_node` for CPU
jobs), Lightning's `trainer.num_nodes = nodes` and `trainer.devices = tasks_per_node` — writes
`config.yaml` into the run folder and submits a `PretrainJob` with submitit's `SlurmExecutor`
(always that one, explicitly: submitit's AutoExecutor picks Slurm whenever `srun` is on PATH).
submitit's folder is `<run>/slurm/` (`<jobid>_submission.sh`, `<jobid>_<task>_log.out/.err`,
pickles), and every submitted job id is appended to `<run>/slurm/jobs.json`, which `submit status`
and `submit logs` read back. `--dry-run` prints the sbatch script that submitit would submit
(submitit's own `_make_submission_file_text`, on an executor that skips submitit's "is srun on
PATH" check), without submitting. Inside the job each task is one Lightning process; Lightning's
`SLURMEnvironment(auto_requeue=False)` gives it its ranks (SLURM_PROCID, SLURM_LOCALID, the first
node as the rendezvous).

Signals, checkpoint and requeue: exactly one owner
--------------------------------------------------
Slurm sends USR2 `signal_delay_s` before the time limit (`#SBATCH --signal=USR2@90`, from submitit)
or on `scancel --signal=USR2 <job>`. submitit owns that signal: before our code runs it installs
its handler, which (on global rank 0) calls the job's `checkpoint()`, dumps the DelayedSubmission it
returns as the job's new pickle, runs `scontrol requeue <job>` and exits. Lightning's own Slurm
auto-requeue (USR1) is disabled, so the two never race. What submitit cannot do alone is save the
*training* state: `checkpoint()` runs inside a signal handler, between two arbitrary bytecodes
(maybe in the middle of an optimizer step), without access to the trainer, and a DDP/DeepSpeed
checkpoint is a collective operation that every rank must enter at the same step. So:

1. `PretrainJob.__call__` (running after submitit installed its handlers) replaces the USR2 handler
   with one that only raises a flag, and keeps submitit's handler to call later. (DataLoader
   workers are forked after this and inherit the flag-only handler.)
2. `RequeueOnSignal` (a Lightning callback, selfsup/launch/checkpointing.py) checks the flag at every
   training batch end, OR-reduced over all ranks (`strategy.reduce_boolean_decision`, one scalar
   all-reduce per step; Lightning does the same for SIGTERM), so all ranks agree on the step.
3. All ranks save `checkpoints/last.ckpt` at that batch boundary (atomically; every rank takes part,
   as DDP and ZeRO checkpoints need).
4. Rank 0 then calls submitit's handler: `checkpoint()` returns `DelayedSubmission(PretrainJob(same
   config, same run folder))`, submitit requeues the job (same job id) and exits; the other ranks
   wait to be stopped by the requeue (exiting on their own could end the step first where
   KillOnBadExit=1).
5. The requeued job runs `PretrainJob` again, and `run_pretrain` resumes from `last.ckpt`: Lightning
   restores the loop state (epoch, batch index within the epoch, global step), so the interrupted
   epoch finishes with its remaining batches (the shard stream is endless with a fixed number of
   batches per epoch, so the loader's length tells Lightning where the epoch ends) and no epoch
   restarts from zero; the stream and augmentations are re-seeded with the resumed step, so the
   resumed job does not replay the first batches of the stream it had already seen.

A USR2 that arrives before training started (while importing or writing shards) reaches submitit's
handler directly and requeues without a new checkpoint: the job resumes from the previous one.
SIGTERM is left to Lightning (which stops at the next batch): Slurm sends it when the job is
cancelled, at the time limit itself, and on a requeue.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from selfsup.core.atomic import write_text_atomic
from selfsup.core.config_hash import to_yaml
from selfsup.core.errors import UserError, closest
from selfsup.core.overrides import coerce_value, parse_overrides

JOBS_FILE = "jobs.json"
SLURM_SUBDIR = "slurm"
LOCAL_KEYS = ("name", "nodes", "gpus_per_node")


# ---- cluster choice and job shape -----------------------------------------------------------------
def profile_dir() -> Path:
    env = os.environ.get("SELFSUP_SLURM_PROFILES")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "slurm" / "profiles"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in profile_dir().glob("*.yaml"))


def slurm_answers(timeout: float = 10.0) -> bool:
    """True when `scontrol ping` reaches a controller that is UP."""
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


# ---- the sbatch script --------------------------------------------------------------------------
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


def slurm_folder(run_dir: Path) -> Path:
    return Path(run_dir).absolute() / SLURM_SUBDIR


def _executor(run_dir: Path, cfg: DictConfig, dry: bool = False):
    import submitit

    cls = submitit.SlurmExecutor
    if dry:
        class _DryRunSlurmExecutor(submitit.SlurmExecutor):
            """Builds the same sbatch text where no `srun` is installed (nothing is submitted)."""

            @classmethod
            def affinity(cls) -> int:
                return 1

        cls = _DryRunSlurmExecutor
    executor = cls(folder=slurm_folder(run_dir), max_num_timeout=int(cfg.cluster.max_requeues))
    executor.update_parameters(**slurm_parameters(cfg))
    return executor


def sbatch_script(cfg: DictConfig, run_dir: Path) -> str:
    """The sbatch script that submitit would submit for this run (nothing is written or submitted)."""
    executor = _executor(run_dir, cfg, dry=True)
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


# ---- the job ----------------------------------------------------------------------------------------
try:
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # submitit is a dependency; this only keeps `import` working without it
    _Checkpointable = object  # type: ignore[assignment,misc]


class _Flag:
    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:  # the signal handler: nothing but a flag
        self.signum = signum

    def is_set(self) -> bool:
        return self.signum is not None


class PretrainJob(_Checkpointable):
    """What a Slurm task runs: `run_pretrain(config, run_dir)`, requeued on USR2 (module docstring)."""

    def __init__(self, cfg_yaml: str, run_dir: str):
        self.cfg_yaml = cfg_yaml
        self.run_dir = str(run_dir)

    def __call__(self) -> dict:
        from selfsup.launch.checkpointing import RequeueOnSignal
        from selfsup.launch.train import run_pretrain

        cfg = OmegaConf.create(self.cfg_yaml)
        usr_sig = _submitit_signal()
        submitit_handler = signal.getsignal(usr_sig)
        flag = _Flag()
        signal.signal(usr_sig, flag)

        def hand_over(trainer) -> None:
            rank = trainer.global_rank
            print(f"selfsup: {signal.Signals(flag.signum).name} received: checkpoint saved at step "
                  f"{trainer.global_step} (epoch {trainer.current_epoch}); "
                  + ("requeueing the job" if rank == 0 else "waiting for rank 0 to requeue the job"), flush=True)
            if rank == 0:
                if callable(submitit_handler):
                    submitit_handler(flag.signum, None)  # checkpoint() -> scontrol requeue -> sys.exit
                raise SystemExit(-1)  # no submitit handler (not under submitit): just stop
            # the requeue stops this task (SIGTERM, default action: no Lightning handler that would try a
            # collective with the departed rank 0); exiting first could end the step (KillOnBadExit=1)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(300)
            raise SystemExit(-1)

        return run_pretrain(cfg, self.run_dir, extra_callbacks=[RequeueOnSignal(flag, hand_over)])

    def checkpoint(self, *args, **kwargs):
        """Called by submitit's USR2 handler on rank 0 after `last.ckpt` was saved: run the same job
        again; `run_pretrain` resumes from the run folder's last checkpoint."""
        from submitit.helpers import DelayedSubmission

        print(f"selfsup: requeueing; the job resumes from {Path(self.run_dir) / 'checkpoints'}", flush=True)
        return DelayedSubmission(type(self)(self.cfg_yaml, self.run_dir))


def _submitit_signal() -> int:
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, "SIG" + name, signal.SIGUSR2)


def submit_slurm(cfg: DictConfig, run_dir: Path) -> dict:
    """Submit the run as a Slurm job; record it in <run>/slurm/jobs.json. Returns the record."""
    if not slurm_answers():
        raise UserError("cluster=slurm: no Slurm controller answers `scontrol ping` (is SLURM_CONF set? "
                        "for a local test cluster: bash slurm/local-cluster.sh start)")
    run_dir = Path(run_dir).absolute()
    executor = _executor(run_dir, cfg)
    job = executor.submit(PretrainJob(to_yaml(cfg), str(run_dir)))
    record = {
        "job_id": str(job.job_id),
        "submitted": time.strftime("%Y-%m-%d %H:%M:%S"),
        "nodes": int(cfg.cluster.nodes),
        "tasks_per_node": tasks_per_node(cfg.cluster),
        "gpus_per_node": int(cfg.cluster.gpus_per_node or 0),
        "stdout": str(job.paths.stdout),
        "stderr": str(job.paths.stderr),
        "submission_file": str(job.paths.submission_file),
    }
    jobs = read_jobs(run_dir)
    jobs.append(record)
    _write_json(slurm_folder(run_dir) / JOBS_FILE, jobs)
    return record


def _write_json(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def read_jobs(run_dir: str | Path) -> list[dict]:
    path = slurm_folder(Path(run_dir)) / JOBS_FILE
    return json.loads(path.read_text()) if path.exists() else []


# ---- reading jobs back: `submit status`, `submit logs` ----------------------------------------------
def slurm_states(job_ids: list[str]) -> dict[str, list[dict]]:
    """Every recorded incarnation of each job (sacct, requeues included), oldest first; squeue's
    view where sacct has nothing (no accounting). {} when no Slurm command answers."""
    if not job_ids:
        return {}
    fields = ["JobID", "State", "Elapsed", "Start", "End", "NodeList", "ExitCode"]
    states: dict[str, list[dict]] = {}
    try:
        out = subprocess.run(["sacct", "-X", "-D", "-P", "-n", "-o", ",".join(fields), "-j", ",".join(job_ids)],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0:
            for line in out.stdout.splitlines():
                row = dict(zip(fields, line.split("|")))
                if row.get("JobID") in job_ids:
                    states.setdefault(row["JobID"], []).append(row)
    except (OSError, subprocess.TimeoutExpired):
        pass
    missing = [j for j in job_ids if j not in states]
    if missing:
        try:
            out = subprocess.run(["squeue", "-h", "-o", "%i|%T|%M|%N", "-j", ",".join(missing)],
                                 capture_output=True, text=True, timeout=30)
            for line in out.stdout.splitlines():
                jid, state, elapsed, nodes = (line.split("|") + ["", "", "", ""])[:4]
                states.setdefault(jid, []).append({"JobID": jid, "State": state, "Elapsed": elapsed, "NodeList": nodes})
        except (OSError, subprocess.TimeoutExpired):
            pass
    return states


def last_step(run_dir: Path) -> dict | None:
    from selfsup.launch.checkpointing import read_last_info

    return read_last_info(Path(run_dir) / "checkpoints")


def run_status(run_dir: Path) -> str:
    """A few lines on one run: cluster, job(s) and their states, last checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise UserError(f"{str(run_dir)!r} is not a run folder (no config.yaml in it)")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    lines = [f"run {run_dir}  ({cfg.method.name} {cfg.backbone.name}, cluster={cfg.cluster.name})"]
    jobs = read_jobs(run_dir)
    states = slurm_states([j["job_id"] for j in jobs])
    for job in jobs:
        history = states.get(job["job_id"], [])
        now = history[-1]["State"] if history else "UNKNOWN (no answer from sacct/squeue)"
        trail = " -> ".join(h["State"] for h in history) if len(history) > 1 else ""
        extra = history[-1] if history else {}
        lines.append(f"  job {job['job_id']}: {now}" + (f"  (history: {trail})" if trail else "")
                     + (f"  elapsed {extra['Elapsed']}" if extra.get("Elapsed") else "")
                     + (f"  nodes {extra['NodeList']}" if extra.get("NodeList") not in (None, "", "None assigned") else "")
                     + f"  submitted {job['submitted']}")
    info = last_step(run_dir)
    if info:
        lines.append(f"  last checkpoint: step {info['global_step']}, epoch {info['epoch']} ({info['time']})")
    else:
        lines.append("  no checkpoint yet")
    if jobs:
        lines.append(f"  logs: submit logs {run_dir}")
    lines.append(f"  tensorboard --logdir {run_dir / 'tb'}")
    return "\n".join(lines)


def recent_runs(root: Path, limit: int = 20) -> list[Path]:
    runs = [p.parent for p in Path(root).glob("*/config.yaml")]
    return sorted(runs, key=lambda p: (p / "config.yaml").stat().st_mtime, reverse=True)[:limit]


def runs_table(root: Path, limit: int = 20) -> str:
    runs = recent_runs(root, limit)
    if not runs:
        return f"no runs under {root}/"
    all_jobs = {run: read_jobs(run) for run in runs}
    states = slurm_states([j["job_id"] for jobs in all_jobs.values() for j in jobs])
    lines = [f"{'run':<48} {'cluster':<8} {'job':<10} {'state':<12} step"]
    for run in runs:
        cfg = OmegaConf.load(run / "config.yaml")
        jobs = all_jobs[run]
        job = jobs[-1]["job_id"] if jobs else "-"
        state = states.get(job, [{}])[-1].get("State", "UNKNOWN") if jobs else "-"
        info = last_step(run)
        lines.append(f"{str(run):<48} {cfg.cluster.name:<8} {job:<10} {state:<12} {info['global_step'] if info else '-'}")
    return "\n".join(lines)


def log_paths(run_dir: Path, task: int = 0, job_id: str | None = None) -> tuple[str, Path, Path]:
    jobs = read_jobs(run_dir)
    if not jobs:
        raise UserError(f"{str(run_dir)!r} has no Slurm jobs (no {SLURM_SUBDIR}/{JOBS_FILE}): a local run logs to the terminal")
    if job_id is None:
        job_id = jobs[-1]["job_id"]
    elif job_id not in [j["job_id"] for j in jobs]:
        raise UserError(f"job {job_id} is not one of this run's jobs ({', '.join(j['job_id'] for j in jobs)})")
    folder = slurm_folder(Path(run_dir))
    return job_id, folder / f"{job_id}_{task}_log.out", folder / f"{job_id}_{task}_log.err"


def print_logs(run_dir: Path, task: int = 0, job_id: str | None = None, tail: int | None = None, out=sys.stdout) -> None:
    job_id, stdout, stderr = log_paths(run_dir, task, job_id)
    for path in (stdout, stderr):
        print(f"==> {path} <==", file=out)
        if not path.exists():
            print("(not written yet: the job may still be pending)", file=out)
            continue
        text = path.read_text(errors="replace")
        if tail:
            text = "\n".join(text.splitlines()[-tail:]) + "\n"
        out.write(text)
        if text and not text.endswith("\n"):
            out.write("\n")
