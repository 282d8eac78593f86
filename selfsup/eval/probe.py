"""`submit probe`: extract pooled features of a frozen backbone once (cached in the run folder) and
hand them to the eval target that the data names (`data.eval_target`, selfsup.eval.targets), which
fits its probe on the train split and scores it on the test split. Results: a table on stdout, the
target's JSON file in the run folder, and TensorBoard. `probe.layers` adds one probe per chosen stage
or block (selfsup.eval.layers), all extracted in the same pass."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sized
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from selfsup.core.atomic import write_atomic, write_text_atomic
from selfsup.core.config_checks import check_numbers
from selfsup.core.config_files import available, config_root, load_config, select_data
from selfsup.core.errors import UserError, unknown_choice
from selfsup.core.overrides import parse_overrides, parse_value, set_key
from selfsup.core.precision import resolve_precision
from selfsup.eval.targets import EvalTarget, ProbeResult, get_target

PIXELS = "pixels"  # the raw-pixel baseline, as the eval target makes it
RANDOM_INIT = "random_init"  # the other baseline: the probed network at its random init
# probe.precision, resolved (selfsup/core/precision.py), and the autocast dtype feature extraction runs in
AUTOCAST_DTYPES = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def extract_features(backbone, loader, device: str | torch.device = "cpu", desc: str = "features",
                     batches: int | None = None, autocast: torch.dtype | None = None):
    """Features of the batches' `image` and their `label`s, concatenated in order; under autocast to
    `autocast` (bf16, fp16) when given, returned as float32."""
    from selfsup.core.progress import progress_bar

    backbone.eval().to(device)
    if any(p.ndim == 4 for p in backbone.parameters()):  # convolutions: NHWC is faster on CPU and GPU
        backbone.to(memory_format=torch.channels_last)
    feats, labels = [], []
    device_type = torch.device(device).type
    with torch.no_grad(), torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
        for batch in progress_bar(loader, total=batches, desc=desc, unit="batch"):
            out = backbone(batch["image"].to(device))
            # a dict: the features of several layers from one pass (selfsup.eval.layers.LayerFeatures)
            feats.append({k: v.float().cpu() for k, v in out.items()} if isinstance(out, dict) else out.float().cpu())
            labels.append(batch["label"])
    if feats and isinstance(feats[0], dict):
        return {k: torch.cat([f[k] for f in feats]) for k in feats[0]}, torch.cat(labels)
    return torch.cat(feats), torch.cat(labels)


def probe_config(overrides: list[str], run_cfg: DictConfig | None) -> DictConfig:
    root = config_root()
    defaults = load_config(root / "defaults.yaml")
    cfg = OmegaConf.merge({"data": defaults.data}, load_config(root / "probe.yaml"))
    pairs = parse_overrides(overrides)
    # where the probe runs (`cluster=slurm nodes=N gpus_per_node=G`: selfsup/launch/probe_job.py)
    cluster = dict(pairs).get("cluster", defaults.cluster.name)
    if cluster not in available("cluster"):
        raise unknown_choice("cluster", cluster, available("cluster"))
    cfg = OmegaConf.merge(cfg, load_config(root / "cluster" / f"{cluster}.yaml"))
    data_choice = dict(pairs).get("data")
    run_target = run_eval_target(run_cfg, root) if run_cfg is not None and data_choice is None else None
    if data_choice is None and run_cfg is not None:
        # the run's own built-in data, else (a run on shards) the default data of its eval target
        if run_cfg.data.name != "shards":
            data_choice = run_cfg.data.name
        elif run_target:
            data_choice = get_target(run_target).default_data
    if data_choice is None and not any(k == "data.test" for k, _ in pairs):
        data_choice = cfg.data.name  # the default data (configs/defaults.yaml)
    if data_choice:
        cfg = select_data(cfg, data_choice)
    if run_target:  # the run's data says what its features are scored on
        cfg.data.eval_target = run_target
    if run_cfg is not None:  # probe at the resolution and normalisation the backbone was trained with
        for key in ("image_size", "mean", "std"):
            cfg.data[key] = run_cfg.data[key]
    for key, raw in pairs:
        if key not in ("data", "cluster"):
            set_key(cfg, key, raw)
    return cfg


def run_eval_target(run_cfg: DictConfig, config_root: Path) -> str | None:
    """The eval target that a run's data names (None: not named)."""
    name = run_cfg.data.get("eval_target")
    if name is None:  # a run saved before data configs named their target: its method's config declares it
        method_file = config_root / "method" / f"{run_cfg.method.name}.yaml"
        name = OmegaConf.select(OmegaConf.load(method_file), "data.eval_target") if method_file.exists() else None
    return name


@dataclass
class ProbedBackbone:
    """The frozen backbone that `submit probe` was given, and where it comes from."""

    backbone: torch.nn.Module
    identity: str  # names the weights, for the feature cache
    run_dir: Path | None = None
    run_cfg: DictConfig | None = None
    step: int = 0
    # how the network is built (its registry name and kwargs): its random-init baseline is the same build
    architecture: tuple[str, dict] | None = None


def load_backbone(target: str, backbone_kwargs: dict | None = None) -> ProbedBackbone:
    """`random:<backbone>` (built with `backbone_kwargs`), a .safetensors export, a .ckpt, or a run folder.
    (The `pixels` baseline is made by the eval target: see run_probe.)"""
    from selfsup.backbones import create_backbone

    if target.startswith("random:"):
        name = target.split(":", 1)[1]
        torch.manual_seed(0)
        kwargs = dict(backbone_kwargs or {})
        return ProbedBackbone(create_backbone(name, **kwargs), f"random:{name}:{json.dumps(kwargs, sort_keys=True)}",
                              architecture=(name, kwargs))
    path = Path(target)
    if path.suffix == ".safetensors":
        from selfsup.export import load_export

        state, meta = load_export(path)
        kwargs = json.loads(meta.get("backbone_kwargs") or "{}")
        backbone = create_backbone(meta["backbone"], **kwargs)
        backbone.net.load_state_dict(state, strict=True)
        return ProbedBackbone(backbone, _file_identity(path), step=int(meta.get("global_step") or 0),
                              architecture=(meta["backbone"], kwargs))
    from selfsup.export import backbone_state_dict, load_checkpoint

    ckpt = load_checkpoint(path)
    meta = ckpt["selfsup"]
    kwargs = dict(meta.get("backbone_kwargs", {}))
    backbone = create_backbone(meta["backbone"], **kwargs)
    backbone.net.load_state_dict(backbone_state_dict(ckpt), strict=True)
    run_dir = path if path.is_dir() else (path.parent.parent if path.parent.name == "checkpoints" else None)
    ckpt_file = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
    return ProbedBackbone(backbone, _file_identity(ckpt_file), run_dir,
                          OmegaConf.create(meta["config"]) if meta.get("config") else None, int(ckpt.get("global_step", 0)),
                          (meta["backbone"], kwargs))


def _file_identity(path: Path) -> str:
    stat = Path(path).stat()
    return f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def probe_features(backbone, cfg: DictConfig, eval_target: EvalTarget, cache_dir: Path | None, identity: str,
                   layers: list[str] | None = None, share=None):
    """{split: {group: (x, labels)}} of the train and test splits as the eval target reads them, from
    the cache when this backbone, target and data were seen. With `layers` (the names that `backbone`,
    a LayerFeatures, gives) x is {layer: features}. With a `share` (selfsup.eval.feature_parts.RankShare)
    of more than one rank, this rank extracts its block of the shards into a part file beside the
    cache; rank 0 gathers the parts and returns the features, the other ranks None."""
    from selfsup.data.stream import resolve_split

    specs = {split: resolve_split(cfg.data, split) for split in ("train", "test")}
    device = probe_device()
    precision = resolve_precision(cfg.probe.precision, device)
    # the layers join the key only when given, and the precision when not fp32: the cache of the
    # final fp32 features keeps its name
    key = hashlib.sha1(json.dumps([identity, eval_target.name, {k: str(v) for k, v in specs.items()},
                                   cfg.data.image_size, list(cfg.data.mean), list(cfg.data.std),
                                   *eval_target.cache_key(cfg), *([{"layers": layers}] if layers else []),
                                   *([precision] if precision != "32-true" else [])]
                                  ).encode()).hexdigest()[:16]
    cache = cache_dir / f"features-{key}.pt" if cache_dir else None
    rank = share.rank if share else 0
    if cache and cache.exists():
        return torch.load(cache, weights_only=True) if rank == 0 else None
    extract = dict(backbone=backbone, cfg=cfg, eval_target=eval_target, device=device,
                   autocast=AUTOCAST_DTYPES[precision])
    if _shared(share):
        return _extract_share(specs, cache, share, extract)
    out = {split: _extract_split(split, specs[split], **extract) for split in ("train", "test")}
    if cache:
        write_atomic(cache, lambda temporary: torch.save(out, temporary))
    return out


def _extract_split(split: str, spec, *, backbone, cfg, eval_target, device, autocast) -> dict:
    groups = eval_target.labelled_batches(cfg, split, spec)
    return {group: extract_features(backbone, batches, device,
                                    desc=f"features {split}" + (f" {group}" if len(groups) > 1 else ""),
                                    batches=batch_count(batches, spec, cfg.probe.batch_size), autocast=autocast)
            for group, batches in groups.items()}


def _extract_share(specs: dict, cache: Path | None, share, extract: dict):
    """This rank's block of every split's shards, written as its part; rank 0 gathers them all."""
    from selfsup.data.stream import expand_urls
    from selfsup.eval.feature_parts import gather_parts, part_file, rank_shards, write_failure, write_part

    if cache is None:
        raise UserError("feature extraction on several ranks gathers the features in a run folder: probe a run "
                        "folder (or a .ckpt inside one)")
    if not extract["eval_target"].splits_by_shard:
        raise UserError(f"the {extract['eval_target'].name} eval target reads its data whole: extract its "
                        "features on one rank (nodes=1 gpus_per_node=1)")
    rank, world_size = share.rank, share.world_size
    if not part_file(cache, rank, world_size).exists():  # a requeued job keeps the parts already written
        try:
            shards = {split: rank_shards(expand_urls(spec), rank, world_size) for split, spec in specs.items()}
            write_part(cache, rank, world_size, {split: _extract_split(split, mine, **extract) if mine else None
                                                 for split, mine in shards.items()})
        except Exception as error:
            write_failure(cache, share, error)
            raise
    if rank != 0:
        return None
    return gather_parts(cache, world_size, attempt=share.attempt, timeout_s=share.wait_s)


def probe_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def batch_count(batches, spec, batch_size: int) -> int | None:
    """How many batches a pass yields, for the progress bar: their own length where they have one,
    else counted from the shards' index.json (None when nothing counts them)."""
    if isinstance(batches, Sized):
        return len(batches)
    from selfsup.data.stream import count_samples

    samples = count_samples(spec)
    return -(-samples // batch_size) if samples else None


def backbone_kwargs(overrides: list[str]) -> dict:
    """`backbone.kwargs.<k>=<v>` overrides: how to build the backbone of a `random:<backbone>` target
    (e.g. backbone.kwargs.img_size=84 backbone.kwargs.patch_size=8)."""
    prefix = "backbone.kwargs."
    return {k[len(prefix):]: parse_value(v) for k, v in parse_overrides(overrides) if k.startswith(prefix)}


def check_probe(cfg: DictConfig, backbone) -> None:
    """Numbers of the probe config, and the backbone against the image size, before features."""
    from selfsup.backbones.base import Backbone
    from selfsup.eval.solver import check_solver

    check_numbers(cfg)
    if str(cfg.probe.precision) not in ("auto", *AUTOCAST_DTYPES):
        raise UserError(f"probe.precision={cfg.probe.precision!r}: use auto (bf16 where the hardware computes it "
                        f"natively, else fp32) or one of {', '.join(AUTOCAST_DTYPES)}")
    check_solver(cfg.probe)
    if isinstance(backbone, Backbone):
        backbone.check_image_size(int(cfg.data.image_size))


@dataclass
class ProbePlan:
    """A probe, checked and ready to extract: its backbone, config, eval target and layers."""

    target: str
    loaded: ProbedBackbone
    cfg: DictConfig
    eval_target: EvalTarget
    positions: list[int] | None  # probe.layers' positions (None: the final features only)

    @property
    def cache_dir(self) -> Path | None:
        return self.loaded.run_dir / "probe" if self.loaded.run_dir else None


def plan_probe(target: str, overrides: list[str]) -> ProbePlan:
    """Load the target, compose and check the probe config: every refusal comes from here, before
    any feature is extracted."""
    kwargs = backbone_kwargs(overrides)
    if kwargs and not target.startswith("random:"):
        raise UserError("backbone.kwargs.* only applies to random:<backbone> (a trained target carries its own)")
    loaded = None if target == PIXELS else load_backbone(target, kwargs)
    overrides = [o for o in overrides if not o.startswith("backbone.kwargs.")]
    cfg = probe_config(overrides, loaded.run_cfg if loaded else None)
    check_probe(cfg, loaded.backbone if loaded else None)
    eval_target = get_target(cfg.data.eval_target)
    positions = check_layers(cfg, loaded.backbone if loaded else None, eval_target)
    if loaded is None:  # the raw-pixel baseline
        loaded = pixel_features(eval_target)
    return ProbePlan(target, loaded, cfg, eval_target, positions)


def run_probe(target: str, overrides: list[str], share=None) -> ProbeResult | None:
    """Probe `target`. With a `share` of several ranks (selfsup.eval.feature_parts.RankShare: the tasks
    of a Slurm job) every rank extracts its block of the shards; rank 0 gathers the features, fits
    and returns the result, the other ranks None."""
    plan = plan_probe(target, overrides)
    loaded, cfg, eval_target = plan.loaded, plan.cfg, plan.eval_target
    record = _probe_record(loaded, plan.positions, cfg, eval_target, plan.cache_dir, share)
    # the random init's features are cached like the target's; the pixels only where ranks must gather them
    baselines = {role: _probe_record(probed, plan.positions if role == RANDOM_INIT else None, cfg, eval_target,
                                     plan.cache_dir if role == RANDOM_INIT or _shared(share) else None, share)
                 for role, probed in baseline_backbones(plan).items()}
    if record is None or None in baselines.values():  # a rank > 0: its parts are written, rank 0 fits
        return None
    if baselines:
        record["baselines"] = baselines
    if _shared(share):
        record["extraction_ranks"] = share.world_size
    record.update({"eval_target": eval_target.name, "target": target, "global_step": loaded.step,
                   "precision": resolve_precision(cfg.probe.precision, probe_device()),
                   "data": OmegaConf.to_container(cfg.data), "probe": OmegaConf.to_container(cfg.probe)})
    result = eval_target.result_type(eval_target.name, record)
    if loaded.run_dir:
        write_text_atomic(loaded.run_dir / eval_target.result_file, json.dumps(result.record, indent=1))
        _log_tensorboard(loaded.run_dir, result.scalars(), loaded.step)
    return result


def _shared(share) -> bool:
    """Whether a share (selfsup.eval.feature_parts.RankShare) splits the extraction over several ranks."""
    return bool(share and share.world_size > 1)


def pixel_features(eval_target: EvalTarget) -> ProbedBackbone:
    """The raw-pixel baseline: the eval target knows what its inputs' pixels are."""
    return ProbedBackbone(eval_target.pixels(), f"{PIXELS}:{eval_target.name}")


def _probe_record(probed: ProbedBackbone, positions: list[int] | None, cfg: DictConfig, eval_target: EvalTarget,
                  cache_dir: Path | None, share) -> dict | None:
    """The eval target's record of one backbone's features (None on a rank > 0 of a share)."""
    if positions is None:
        features = probe_features(probed.backbone, cfg, eval_target, cache_dir, probed.identity, share=share)
        return None if features is None else eval_target.evaluate(features, cfg)
    return evaluate_layers(probed.backbone, positions, cfg, eval_target, cache_dir, probed.identity, share)


def baseline_backbones(plan: ProbePlan) -> dict[str, ProbedBackbone]:
    """`probe.baselines=true` on a trained backbone: the same network at its random init (built as the
    target was, seeded as `random:<backbone>` is) and the eval target's raw pixels, probed with the same
    data and settings. Nothing for a target that is itself a baseline."""
    probed = plan.loaded
    if not plan.cfg.probe.get("baselines") or probed.architecture is None or plan.target.startswith("random:"):
        return {}
    name, kwargs = probed.architecture
    return {RANDOM_INIT: load_backbone(f"random:{name}", kwargs),
            PIXELS: pixel_features(plan.eval_target)}


def check_layers(cfg: DictConfig, backbone, eval_target: EvalTarget) -> list[int] | None:
    """The positions of the layers that `probe.layers` names (None: the final features only), checked
    against the eval target and the backbone before any feature is extracted."""
    from selfsup.eval.layers import requested_layers, resolve_layers, show_layers

    value = requested_layers(cfg)
    if value is None:
        return None
    if backbone is None:  # raw pixels are one layer: the probe reads them as they are
        print(f"selfsup: {PIXELS} has no layers: probe.layers={show_layers(value)} ignored", file=sys.stderr)
        cfg.probe.layers = None
        return None
    if not eval_target.scores_layers:
        raise UserError(f"probe.layers={show_layers(value)}: the {eval_target.name} eval target probes the final "
                        "pooled features only; leave probe.layers unset")
    return resolve_layers(value, backbone)


def evaluate_layers(backbone, positions: list[int], cfg: DictConfig, eval_target: EvalTarget, cache_dir: Path | None,
                    identity: str, share=None) -> dict | None:
    """The eval target's record of the final pooled features, with `layers`: one row per chosen layer.
    All layers come from one pass over the data; the last layer's features are the final ones, so its
    row is the record's own scores (evaluated once)."""
    from selfsup.eval.layers import LayerFeatures, layer_features

    extractor = LayerFeatures(backbone, positions)
    features = probe_features(extractor, cfg, eval_target, cache_dir, identity, extractor.names, share)
    if features is None:  # a rank > 0 (probe_features)
        return None
    record = eval_target.evaluate(layer_features(features, extractor.final), cfg)
    names, modules = backbone.layer_names(), backbone.layer_modules()
    rows = []
    for position in positions:
        name = names[position]
        scores = record if name == extractor.final else eval_target.evaluate(layer_features(features, name), cfg)
        rows.append({"layer": name, "module": modules[position], **eval_target.layer_row(scores)})
    record["layers"] = rows
    return record


def _log_tensorboard(run_dir: Path, scalars: dict[str, float], step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir / "tb")) as writer:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)


def run_probe_command(target: str, overrides: list[str]) -> int:
    if target != PIXELS and not target.startswith("random:") and not Path(target).exists():
        raise UserError(f"{target!r} does not exist (give a run folder, a .ckpt, a .safetensors export, "
                        "random:<backbone> or pixels)")
    print(run_probe(target, overrides).table(target))
    return 0
