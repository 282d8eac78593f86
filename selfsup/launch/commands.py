"""The `submit` sub-commands."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from selfsup.core.errors import UserError


def resolve_pretrain(method: str, backbone: str, overrides: list[str]):
    """The config and run folder of `submit pretrain`: a new run, or a resumed one."""
    from selfsup.launch.config import compose
    from selfsup.launch.run_config import resolve_run

    cfg, run_dir, _ = resolve_run(method, backbone, overrides, compose)
    return cfg, run_dir


# set by `submit pretrain` for the processes that Lightning's local DDP launcher starts (ranks > 0
# re-run the same command line): they join the parent's run folder and config instead of making new ones
LAUNCHED_RUN_DIR_ENV = "_SELFSUP_LAUNCHED_RUN_DIR"


def _launched_rank_run_dir() -> Path | None:
    folder = os.environ.get(LAUNCHED_RUN_DIR_ENV)
    if folder and os.environ.get("LOCAL_RANK", "0") != "0" and (Path(folder) / "config.yaml").exists():
        return Path(folder)
    return None


def pretrain(args) -> int:
    from selfsup.launch.cluster import prepare_cluster

    launched = _launched_rank_run_dir()
    if launched is not None:  # a rank > 0 of a local multi-device run
        from selfsup.launch.train import run_training

        result = run_training(OmegaConf.load(launched / "config.yaml"), launched)
        return exit_status(result)
    cfg, run_dir = resolve_pretrain(args.method, args.backbone, args.overrides)
    prepare_cluster(cfg, args.overrides, resumed=bool(cfg.resume))
    on_slurm = cfg.cluster.name == "slurm"
    from selfsup.launch.strategies import check_strategy
    from selfsup.launch.validate import check_pretrain

    check_strategy(cfg, submit_to_slurm=on_slurm)  # e.g. DeepSpeed without CUDA: one line, before anything runs
    # a config that cannot run: one line, before the run folder (the data only where it will be read now)
    check_pretrain(cfg, data_is_here=not on_slurm and not args.dry_run)
    if args.dry_run:
        _print_dry_run(cfg, run_dir, on_slurm)
        return 0
    from selfsup.core.overrides import parse_overrides, uses_demo_data

    if uses_demo_data(parse_overrides(args.overrides)) and not cfg.resume:
        print(f"selfsup: no data given: pretraining on the built-in demo data {cfg.data.name!r} "
              f"(pass data=<shards> for your own)")
    return _start_run(cfg, run_dir, on_slurm, f"run folder {run_dir}")


def _start_run(cfg, run_dir: Path, on_slurm: bool, banner: str) -> int:
    """Write the run's config.yaml, then train here or submit the job to Slurm (which resolves
    `trainer.precision=auto` on its node, in run_training)."""
    from selfsup.core.run_folder import write_run_config

    if not on_slurm:
        from selfsup.launch.precision import resolve_run_precision

        resolve_run_precision(cfg)
    new_folder = not run_dir.exists()
    write_run_config(run_dir, cfg)
    if on_slurm:
        return _submit_to_slurm(cfg, run_dir)
    print(f"selfsup: {banner}  (tensorboard --logdir {run_dir / 'tb'})", flush=True)
    return _pretrain_here(cfg, run_dir, new_folder)


def _print_dry_run(cfg, run_dir: Path, on_slurm: bool) -> None:
    """--dry-run: the run folder and resolved config, and with cluster=slurm the sbatch script."""
    from selfsup.core.config_hash import to_yaml

    print(f"# run folder: {run_dir}")
    print(to_yaml(cfg), end="")
    if on_slurm:
        from selfsup.launch.sbatch import sbatch_script

        print("# ---- the sbatch script submitit would submit (not submitted: --dry-run) ----")
        print(sbatch_script(cfg, run_dir), end="")


def _pretrain_here(cfg, run_dir: Path, new_folder: bool) -> int:
    """Train in this process (and the local ranks it starts); end with one line on what the run did.
    A folder this command made for a run that never took a step is removed again."""
    from selfsup.ssl.callbacks import RunTally
    from selfsup.launch.train import run_training

    os.environ[LAUNCHED_RUN_DIR_ENV] = str(run_dir.absolute())
    tally = RunTally()
    start = time.perf_counter()
    try:
        result = run_training(cfg, run_dir, extra_callbacks=[tally])
    finally:
        removed = new_folder and not tally.reached_first_step and remove_unstarted_run(run_dir)
    if removed and not result["interrupted"]:
        raise UserError(f"no training step was taken: the data gave no batch ({result['skipped_samples']} samples "
                        f"could not be decoded, {result['skipped_shards']} shards could not be read); "
                        f"removed the run folder {run_dir}")
    if removed:
        print(f"selfsup: stopped before the first step; removed the run folder {run_dir}")
    else:
        print(summary_line(result, tally, time.perf_counter() - start, run_dir))
    if result.get("finetune"):
        r = result["finetune"]
        print(f"selfsup: test top-1 {r['top1']:.2f}, top-5 {r['top5']:.2f} ({r['test_samples']} images) with the weights "
              f"of step {r['best_step']} (validation top-1 {r['val_top1']:.2f}, {r['labelled_samples']} labelled "
              f"train images); {run_dir / 'finetune.json'}, {run_dir / 'model.safetensors'}")
    return exit_status(result)


def exit_status(result: dict) -> int:
    """0 for a finished run; a shell's status for the signal that ended it: 143 for SIGTERM (after its
    checkpoint), 130 for Ctrl-C."""
    if result.get("ended_by") == "SIGTERM":
        return 143
    return 130 if result["interrupted"] else 0


def remove_unstarted_run(run_dir: Path) -> bool:
    """Remove the folder of a run that never took a step, unless it holds a checkpoint."""
    import shutil

    from selfsup.launch.checkpointing import resolve_last

    if resolve_last(run_dir / "checkpoints") is not None:
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


def summary_line(result: dict, tally, wall_seconds: float, run_dir: Path) -> str:
    from selfsup.ssl.callbacks import format_seconds
    from selfsup.launch.checkpointing import resolve_last

    ended = (f"ended by {result['ended_by']}" if result.get("ended_by")
             else "interrupted" if result["interrupted"] else "done")
    checkpoint = resolve_last(run_dir / "checkpoints")
    return (f"selfsup: {ended} at step {result['global_step']} ({tally.steps} steps in this run); "
            f"{tally.images_per_second():.1f} images/s; wall time {format_seconds(wall_seconds)}; "
            f"checkpoint {checkpoint or 'none'}; skipped {result['skipped_samples']} corrupt samples"
            + (f" and {result['skipped_shards']} unreadable shards" if result.get("skipped_shards") else ""))


def _submit_to_slurm(cfg, run_dir: Path) -> int:
    from selfsup.launch.slurm_job import submit_slurm

    job = submit_slurm(cfg, run_dir)
    shape = f"{job['nodes']} node(s) x {job['tasks_per_node']} task(s)" + (
        f", {job['gpus_per_node']} GPU(s) per node" if job["gpus_per_node"] else "")
    print(f"selfsup: submitted Slurm job {job['job_id']} ({shape})")
    print(f"  run folder:  {run_dir}")
    print(f"  logs:        {job['stdout']}")
    print(f"               {job['stderr']}")
    print(f"  status:      submit status {run_dir}")
    print(f"  follow logs: submit logs {run_dir}")
    print(f"  tensorboard --logdir {run_dir / 'tb'}")
    return 0


def finetune(args) -> int:
    from selfsup.core.run_folder import is_run_folder, load_run_config, new_run_dir
    from selfsup.launch import finetune as ft
    from selfsup.launch.cluster import prepare_cluster
    from selfsup.launch.strategies import check_strategy

    launched = _launched_rank_run_dir()
    if launched is not None:  # a rank > 0 of a local multi-device run
        from selfsup.launch.train import run_training

        return exit_status(run_training(OmegaConf.load(launched / "config.yaml"), launched))
    resume = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("resume=")), None)
    overrides = [o for o in args.overrides if not o.startswith("resume=")]
    if resume is not None:  # the saved config, the other overrides on top
        cfg = load_run_config(resume, name=f"resume={resume!r}")
        if cfg.method.name != "finetune":
            raise UserError(f"resume={resume!r} is a {cfg.method.name} run: resume it with `submit pretrain`")
        for key, raw in ft.parse_overrides(overrides):
            ft.set_key(cfg, key, raw)
        cfg.resume = resume
        run_dir = Path(resume)
    else:
        cfg = ft.compose(args.source, overrides)
        run_dir = new_run_dir(cfg)
        if is_run_folder(run_dir):
            raise UserError(f"run folder {run_dir} exists: pass resume={run_dir} to continue it, or another run_name")
    prepare_cluster(cfg, overrides, resumed=resume is not None)
    on_slurm = cfg.cluster.name == "slurm"
    check_strategy(cfg, submit_to_slurm=on_slurm)
    ft.check_finetune(cfg)
    if resume is None:
        ft.prepare_kwargs(cfg, ft.class_count(cfg))
    if args.dry_run:
        _print_dry_run(cfg, run_dir, on_slurm)
        return 0
    return _start_run(cfg, run_dir, on_slurm, f"fine-tuning {cfg.finetune.source} in {run_dir}")


def probe(args) -> int:
    from selfsup.launch.probe_job import probe_command

    return probe_command(args.target, args.overrides)


def continual(args) -> int:
    from selfsup.continual.config import check_settings, compose
    from selfsup.core.config_hash import to_yaml
    from selfsup.core.run_folder import write_run_config
    from selfsup.launch.run_config import resolve_run

    cfg, run_dir, resumed = resolve_run(args.method, args.backbone, args.overrides, compose)
    check_settings(cfg)  # the config alone, before torch is imported
    from selfsup.continual.train import check_continual

    check_continual(cfg)  # a config that cannot run: one line, before the run folder
    if args.dry_run:
        print(f"# run folder: {run_dir}" + (" (resumed)" if resumed else ""))
        print(to_yaml(cfg), end="")
        return 0
    write_run_config(run_dir, cfg)
    print(f"selfsup: run folder {run_dir}  (tensorboard --logdir {run_dir / 'tb'})", flush=True)
    from selfsup.continual.train import run_continual

    result = run_continual(cfg, run_dir)
    s = result["summary"]
    print(f"selfsup: {s['tasks_done']} tasks done; metrics {run_dir / 'metrics.json'}; "
          f"checkpoint {run_dir / 'checkpoints' / 'continual.pt'}"
          + (f"; skipped {result['skipped_samples']} corrupt samples" if result["skipped_samples"] else ""))
    return 0


def export(args) -> int:
    from selfsup.core.errors import unknown_choice
    from selfsup.export import EXPORT_FORMATS, HF_FORMAT, check_hf_folder, export_backbone, export_hf, run_folder_of

    if args.format not in EXPORT_FORMATS:
        raise unknown_choice("export format (--format)", args.format, EXPORT_FORMATS)
    if args.format != HF_FORMAT:
        out = export_backbone(args.source, args.output, fmt=args.format)
        print(f"selfsup: wrote {out}")
        return 0
    check_hf_folder(args.output, args.force)
    from selfsup.eval.targets import saved_results

    run = run_folder_of(args.source)
    tables = [result.table(f"the run at step {result['global_step']}, data={result['data']['name']}")
              for result in (saved_results(run) if run else [])]
    out = export_hf(args.source, args.output, force=args.force, probe_tables=tables)
    print(f"selfsup: wrote {out}/ (timm.create_model('local-dir:{out}', pretrained=True) loads it; see its README.md)")
    return 0


BUILTIN_PREFIX = "builtin:"  # `submit shards builtin:NAME OUT`: the built-in data NAME, even beside a folder NAME


def shard_source(source: str):
    """The built-in data (a selfsup.data.kinds.DataKind) that SOURCE of `submit shards` names, or None
    for an image folder. A registered name means that data wherever the command runs, and a folder is
    given as a path (with a `/`, or starting with `.`); a bare name that is also a folder here is
    refused rather than guessed."""
    from selfsup.data.kinds import find_kind, kind_names
    from selfsup.core.errors import unknown_choice

    if source.startswith(BUILTIN_PREFIX):
        kind = find_kind(source[len(BUILTIN_PREFIX):])
        if kind is None:
            raise unknown_choice("built-in data", source[len(BUILTIN_PREFIX):], kind_names())
        return kind
    if "/" in source or source.startswith("."):
        return None
    kind = find_kind(source)
    if kind is None:
        if not Path(source).exists():
            raise unknown_choice("shard source (built-in data, or an image folder such as ./images)", source, kind_names())
        return None
    if Path(source).is_dir():
        raise UserError(f"{source!r} is both built-in data and the folder ./{source} here: "
                        f"write ./{source} for the folder or {BUILTIN_PREFIX}{source} for the built-in data")
    return kind


def check_shard_options(args) -> None:
    for flag, value in (("--samples-per-shard", args.samples_per_shard), ("--frames", args.frames),
                        ("--max-episode-frames", args.max_episode_frames)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: give a positive number")
    if args.test_frames is not None and args.test_frames < 0:
        raise UserError(f"--test-frames {args.test_frames}: give 0 (no test split) or a positive number")


def shards(args) -> int:
    from selfsup.data.remote import is_pipe
    from selfsup.data.shards import check_pipe_destination, index_destination

    check_shard_options(args)
    piped = is_pipe(args.output)
    if piped:
        check_pipe_destination(args.output)
    out = args.output if piped else Path(args.output)
    kind = shard_source(args.source)
    if kind is not None:
        print(kind.write(out, vars(args)))
    else:
        from selfsup.data.shards import write_shards_from

        written = write_shards_from(args.source, out, samples_per_shard=args.samples_per_shard or 5000)
        print(f"selfsup: wrote {len(written)} shards to {args.output}")
    if piped:
        print(f"selfsup: index.json went last, through {index_destination(args.output)!r}")
    return 0


def report(args) -> int:
    from selfsup.report.run_report import write_report

    written = write_report(args.run, args.output, png=not args.no_png, width=args.width, height=args.height)
    print(written.line, file=sys.stderr if written.status else sys.stdout)
    return written.status


def backbones(args) -> int:
    import torch

    from selfsup.backbones import backbone_names, create_backbone, get_spec

    print(f"{'name':<20} {'family':<8} {'params':>10}  timm name / description")
    for name in backbone_names():
        spec = get_spec(name)
        with torch.device("meta"):  # shapes only: no memory, no random init
            params = sum(p.numel() for p in create_backbone(name).parameters())
        print(f"{name:<20} {spec.family:<8} {params / 1e6:>9.2f}M  {spec.timm_name}: {spec.description}")
    return 0


def methods(args) -> int:
    from selfsup.ssl import METHODS

    for name, entry in METHODS.items():
        print(f"{name:<12} backbones: {'/'.join(entry.families):<12} {entry.summary}")
    from selfsup.continual.config import METHODS as CONTINUAL

    for name, summary in CONTINUAL.items():
        print(f"{name:<12} backbones: {'vit':<12} (submit continual) {summary}")
    return 0


def status(args) -> int:
    from selfsup.launch.run_records import run_status, runs_table

    if args.run:
        print(run_status(Path(args.run)))
    else:
        print(runs_table(Path(args.run_dir), limit=args.limit))
    return 0


def logs(args) -> int:
    from selfsup.launch.run_records import print_logs

    if not (Path(args.run) / "config.yaml").exists():
        raise UserError(f"{args.run!r} is not a run folder (no config.yaml in it)")
    print_logs(Path(args.run), task=args.task, job_id=args.job, tail=args.tail)
    return 0
