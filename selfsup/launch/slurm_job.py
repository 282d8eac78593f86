"""The Slurm job of a pretraining run: `submit pretrain ... cluster=slurm` composes the config,
applies the cluster profile and job shape (cluster.py), writes `config.yaml` into the run folder and
submits a `PretrainJob` with submitit (sbatch.py); the job id goes into `<run>/slurm/jobs.json`
(run_records.py).

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

import os
import signal
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from selfsup.core.config_hash import to_yaml
from selfsup.core.errors import UserError
from selfsup.launch.cluster import slurm_answers, tasks_per_node
from selfsup.launch.run_records import record_job
from selfsup.launch.sbatch import slurm_executor

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
    executor = slurm_executor(run_dir, cfg)
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
    record_job(run_dir, record)
    return record
