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
   with one that only raises a flag (`SignalFlag`), and keeps submitit's handler to call later.
2. `CheckpointOnSignal` (a Lightning callback, selfsup/launch/checkpointing.py) checks the flag at
   every training batch end, max-reduced over all ranks (one scalar all-reduce per step), so all
   ranks agree on the step.
3. All ranks save `checkpoints/last.ckpt` at that batch boundary (atomically; every rank takes part,
   as DDP and ZeRO checkpoints need).
4. Rank 0 then calls submitit's handler: `checkpoint()` returns `DelayedSubmission(PretrainJob(same
   config, same run folder))`, submitit requeues the job (same job id) and exits; the other ranks
   wait to be stopped by the requeue (exiting on their own could end the step first where
   KillOnBadExit=1).
5. The requeued job runs `PretrainJob` again, and `run_pretrain` resumes from `last.ckpt`: Lightning
   restores the loop state (epoch, batch index within the epoch, global step) and the data stream's
   (selfsup/data/epoch_stream.py), so the interrupted epoch finishes with exactly the batches it had
   left and no epoch restarts from zero.

A USR2 that arrives before training started (while importing or writing shards) reaches submitit's
handler directly and requeues without a new checkpoint: the job resumes from the previous one.

SIGTERM (a preemption, `scancel`, the time limit itself) goes through the same flag and callback:
every rank saves at the next step and the job ends there (submitit would only log it, and Lightning
would end the run without a checkpoint); where Slurm requeues a preempted job, it resumes from that
checkpoint. The DataLoader workers ignore it (Slurm signals every process of the job) and end with
their rank. Ranks > 0 waiting for a USR2 requeue restore SIGTERM's default action first.
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


class PretrainJob(_Checkpointable):
    """What a Slurm task runs: `run_training(config, run_dir)`, requeued on USR2 (module docstring)."""

    def __init__(self, cfg_yaml: str, run_dir: str):
        self.cfg_yaml = cfg_yaml
        self.run_dir = str(run_dir)

    def __call__(self) -> dict:
        from selfsup.launch.checkpointing import SignalFlag
        from selfsup.launch.train import run_training

        cfg = OmegaConf.create(self.cfg_yaml)
        usr_sig = _submitit_signal()
        submitit_handler = signal.getsignal(usr_sig)
        flag = SignalFlag()
        signal.signal(usr_sig, flag)

        def hand_over(trainer, signum: int) -> None:
            rank = trainer.global_rank
            print(f"selfsup: {signal.Signals(signum).name} received: checkpoint saved at step "
                  f"{trainer.global_step} (epoch {trainer.current_epoch}); "
                  + ("requeueing the job" if rank == 0 else "waiting for rank 0 to requeue the job"), flush=True)
            if rank == 0:
                if callable(submitit_handler):
                    submitit_handler(signum, None)  # checkpoint() -> scontrol requeue -> sys.exit
                raise SystemExit(-1)  # no submitit handler (not under submitit): just stop
            # the requeue stops this task (SIGTERM, default action: no Lightning handler that would try a
            # collective with the departed rank 0); exiting first could end the step (KillOnBadExit=1)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(300)
            raise SystemExit(-1)

        return run_training(cfg, self.run_dir, on_signal={usr_sig: hand_over}, signal_flag=flag)

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
