"""What `submit status` and `submit logs` read back: the Slurm jobs of a run (every submitted job
id is appended to `<run>/slurm/jobs.json`), their states from sacct/squeue, the last checkpoint,
and the jobs' log files in submitit's folder `<run>/slurm/`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from selfsup.core.atomic import write_text_atomic
from selfsup.core.errors import UserError
from selfsup.core.run_folder import load_run_config

JOBS_FILE = "jobs.json"
SLURM_SUBDIR = "slurm"


def slurm_folder(run_dir: Path) -> Path:
    """submitit's folder of a run: job scripts, pickles, logs, and jobs.json."""
    return Path(run_dir).absolute() / SLURM_SUBDIR


def record_job(run_dir: str | Path, record: dict, folder: Path | None = None) -> None:
    """Append `record` to the jobs.json of the run's submitit folder (or of `folder`)."""
    jobs = read_jobs(run_dir, folder)
    jobs.append(record)
    write_text_atomic((folder or slurm_folder(Path(run_dir))) / JOBS_FILE, json.dumps(jobs, indent=1) + "\n")


def read_jobs(run_dir: str | Path, folder: Path | None = None) -> list[dict]:
    path = (folder or slurm_folder(Path(run_dir))) / JOBS_FILE
    return json.loads(path.read_text()) if path.exists() else []


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
    cfg = load_run_config(run_dir)
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


def print_logs(run_dir: Path, task: int = 0, job_id: str | None = None, tail: int | None = None, out=None) -> None:
    out = out or sys.stdout  # looked up at call time, so a caller's redirection holds
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
