"""The training job: what runs on the machine (locally, or inside a Slurm task)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def cluster_plugins() -> list:
    """Inside a Slurm allocation: Lightning's SLURMEnvironment for the ranks, with its own
    auto-requeue off (submitit owns USR2 and the requeue: selfsup/launch/slurm_job.py)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def build_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks=(), module=None, on_signal=None, signal_flag=None):
    """Lightning's Trainer for a pretraining run. SIGTERM saves `last.ckpt` at the next step on every
    rank and ends the fit; `on_signal` adds other signals' actions (signal number -> action(trainer,
    signum), run after that checkpoint), recorded by `signal_flag` (selfsup/launch/checkpointing.py)."""
    import signal

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import TensorBoardLogger

    from selfsup.ssl.callbacks import EpochWithoutData, ImagesPerSecond, RunProgressBar, SampleKeyLog
    from selfsup.launch.checkpointing import (AtomicCheckpointIO, CheckpointOnSignal, LastCheckpoint,
                                              end_after_checkpoint)
    from selfsup.launch.precision import apply_precision
    from selfsup.launch.strategies import build_strategy, strategy_callbacks, sync_batchnorm

    apply_precision(cfg)  # run_pretrain has resolved it already; other callers get the same rule
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs = {k: v for k, v in trainer_kwargs.items() if v is not None}
    callbacks = [
        LastCheckpoint(run_dir / "checkpoints", cfg.checkpoint_every_n_steps),
        LearningRateMonitor(logging_interval="step"),
        ImagesPerSecond(),
        EpochWithoutData(),
        *strategy_callbacks(cfg),
        *extra_callbacks,
    ]
    if cfg.data.get("log_keys"):
        callbacks.append(SampleKeyLog(run_dir / "keys"))
    if trainer_kwargs.get("enable_progress_bar", True):
        callbacks.append(RunProgressBar())
    callbacks.append(CheckpointOnSignal({signal.SIGTERM: end_after_checkpoint, **(on_signal or {})}, signal_flag))
    return pl.Trainer(
        **trainer_kwargs,
        strategy=build_strategy(cfg, module),
        sync_batchnorm=sync_batchnorm(cfg),
        logger=TensorBoardLogger(str(run_dir), name="tb", version="", default_hp_metric=False),
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO(), *cluster_plugins()],
        default_root_dir=str(run_dir),
        enable_checkpointing=False,  # LastCheckpoint owns checkpoints
        use_distributed_sampler=False,  # the shard stream splits data by rank itself
    )


def run_training(cfg: DictConfig, run_dir: str | Path, extra_callbacks=(), on_signal=None, signal_flag=None) -> dict:
    """The job of a run folder's config, wherever it runs (this process, a local rank, a Slurm task):
    a fine-tuning run (`submit finetune`, selfsup/launch/finetune.py) or a pretraining run."""
    if cfg.method.name == "finetune":
        from selfsup.launch.finetune import run_finetune

        return run_finetune(cfg, run_dir, extra_callbacks=extra_callbacks, on_signal=on_signal, signal_flag=signal_flag)
    return run_pretrain(cfg, run_dir, extra_callbacks=extra_callbacks, on_signal=on_signal, signal_flag=signal_flag)


def run_pretrain(cfg: DictConfig, run_dir: str | Path, extra_callbacks=(), on_signal=None, signal_flag=None) -> dict:
    """Pretrain `cfg` in `run_dir` (see `fit_run`)."""

    def build(cfg: DictConfig):
        from selfsup.data.stream import ShardDataModule
        from selfsup.ssl import method_class

        method_cls = method_class(cfg.method.name)
        datamodule = ShardDataModule(cfg.data, train_view=None, seed=cfg.seed)
        if datamodule.classes is None and cfg.data.name == "shards":
            print("selfsup: the training shards carry no labels: the online probe is off")
        module = method_cls(cfg, num_classes=len(datamodule.classes) if datamodule.classes else None)
        datamodule.train_view = module.train_view()
        return module, datamodule

    return fit_run(cfg, run_dir, build, extra_callbacks=extra_callbacks, on_signal=on_signal, signal_flag=signal_flag)


def fit_run(cfg: DictConfig, run_dir: str | Path, build, extra_callbacks=(), on_signal=None, signal_flag=None) -> dict:
    """Train the module and data that `build(cfg)` returns in `run_dir`, resuming from its last
    checkpoint if there is one.

    Lightning restores the loop state and the data stream's (selfsup/data/epoch_stream.py), so an
    interrupted epoch goes on with exactly the batches it had left. The augmentations and the
    method's own random draws are re-seeded with the step the run resumes from, so that they do not
    replay the draws of the steps already taken. A SIGTERM ends the fit after a checkpoint at the
    next step: the result's "ended_by" is then "SIGTERM"."""
    import lightning.pytorch as pl

    from lightning.pytorch.utilities import rank_zero_only
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from selfsup.core.run_folder import write_run_config
    from selfsup.launch.checkpointing import read_last_info, resolve_last
    from selfsup.launch.precision import resolve_run_precision
    from selfsup.launch.strategies import check_strategy

    run_dir = Path(run_dir)
    # `auto` left for this machine to resolve (a Slurm job): config.yaml then says what the run
    # trains with, as the checkpoints' config_hash does
    if resolve_run_precision(cfg) and rank_zero_only.rank == 0:
        write_run_config(run_dir, cfg)
    check_strategy(cfg)
    last = resolve_last(run_dir / "checkpoints")
    resume_step = int((read_last_info(run_dir / "checkpoints") or {}).get("global_step", 0)) if last else 0
    pl.seed_everything(cfg.seed + resume_step, workers=True, verbose=False)
    module, datamodule = build(cfg)
    trainer = build_trainer(cfg, run_dir, extra_callbacks=extra_callbacks, module=module, on_signal=on_signal,
                            signal_flag=signal_flag)
    ckpt_path = str(last) if last else None
    if ckpt_path:
        print(f"selfsup: resuming from {last}" + (f" (step {resume_step})" if resume_step else ""), flush=True)
    ended_by = None
    try:
        with warnings.catch_warnings():
            # Lightning looks for a loader's own state_dict; the stream's position travels in the
            # DataModule's state instead (selfsup/data/epoch_stream.py), so a mid-epoch resume is exact
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:
        ended_by = "SIGTERM"
    return {"global_step": trainer.global_step, "run_dir": str(run_dir),
            "skipped_samples": int(datamodule.skipped.value), "skipped_shards": int(datamodule.skipped_shards.value),
            "interrupted": trainer.interrupted, "ended_by": ended_by}
