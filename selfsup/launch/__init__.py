"""The `submit` CLI and what it launches, the top layer (it may import every other).

- cli.py, commands.py   the command line and its sub-commands
- config.py             composition of a pretraining config (needs the backbone and method registries)
- run_config.py         the config and folder of a new or resumed run (pretrain and continual)
- precision.py          `trainer.precision=auto`, resolved where the run trains
- cluster.py            local or Slurm, the Slurm profile and the job shape
- sbatch.py             submitit's SlurmExecutor for a run and its sbatch script
- slurm_job.py          the Slurm job: submit, USR2 -> checkpoint -> requeue
- run_records.py        a run's Slurm jobs read back for `submit status` and `submit logs`
- train.py              the training job (locally, or inside a Slurm task)
- checkpointing.py, callbacks.py, strategies.py   Lightning pieces of the training job
"""
