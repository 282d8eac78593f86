"""The `submit` sub-commands."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import OmegaConf

from selfsup.errors import UserError


def new_run_dir(cfg) -> Path:
    name = cfg.run_name or f"{cfg.method.name}-{cfg.backbone.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.run_dir) / name


def load_run_config(folder: str):
    path = Path(folder) / "config.yaml"
    if not path.exists():
        raise UserError(f"resume={folder!r} is not a run folder (no config.yaml in it)")
    return OmegaConf.load(path)


def resolve_pretrain(method: str, backbone: str, overrides: list[str]):
    """The config and run folder of `submit pretrain`: a new run, or a resumed one."""
    from selfsup.launch.config import compose

    resume = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), None)
    if resume:
        base = load_run_config(resume)
        if (base.method.name, base.backbone.name) != (method, backbone):
            raise UserError(f"resume={resume!r} is a {base.method.name} {base.backbone.name} run, not {method} {backbone}")
        cfg = compose(method, backbone, [o for o in overrides if not o.startswith("resume=")], base=base)
        cfg.resume = resume
        return cfg, Path(resume)
    cfg = compose(method, backbone, overrides)
    return cfg, new_run_dir(cfg)


def pretrain(args) -> int:
    from selfsup.launch.config import to_yaml

    cfg, run_dir = resolve_pretrain(args.method, args.backbone, args.overrides)
    if args.dry_run:
        print(f"# run folder: {run_dir}")
        print(to_yaml(cfg), end="")
        return 0
    if not any(o.startswith(("data=", "data.train=", "data.name=")) for o in args.overrides) and not cfg.resume:
        print(f"selfsup: no data given: pretraining on the built-in demo data {cfg.data.name!r} "
              f"(pass data=<shards> for your own)")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    print(f"selfsup: run folder {run_dir}  (tensorboard --logdir {run_dir / 'tb'})", flush=True)
    from selfsup.launch.train import run_pretrain

    result = run_pretrain(cfg, run_dir)
    print(f"selfsup: done at step {result['global_step']}; checkpoint {run_dir / 'checkpoints' / 'last.ckpt'}"
          + (f"; skipped {result['skipped_samples']} corrupt samples" if result["skipped_samples"] else ""))
    return 130 if result["interrupted"] else 0


def probe(args) -> int:
    from selfsup.eval.probe import run_probe_command

    return run_probe_command(args.target, args.overrides)


def export(args) -> int:
    from selfsup.export import export_backbone

    out = export_backbone(args.source, args.output, fmt=args.format)
    print(f"selfsup: wrote {out}")
    return 0


def shards(args) -> int:
    from selfsup.data.shards import write_shards_from

    written = write_shards_from(args.source, args.output, samples_per_shard=args.samples_per_shard)
    print(f"selfsup: wrote {len(written)} shards to {args.output}")
    return 0


def backbones(args) -> int:
    from selfsup.backbones import backbone_names, create_backbone, get_spec

    print(f"{'name':<20} {'family':<8} {'params':>10}  timm name / description")
    for name in backbone_names():
        spec = get_spec(name)
        params = sum(p.numel() for p in create_backbone(name).parameters())
        print(f"{name:<20} {spec.family:<8} {params / 1e6:>9.2f}M  {spec.timm_name}: {spec.description}")
    return 0


def methods(args) -> int:
    from selfsup.ssl import METHODS

    for name, entry in METHODS.items():
        print(f"{name:<12} backbones: {'/'.join(entry.families):<12} {entry.summary}")
    return 0
