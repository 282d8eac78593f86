"""`submit probe`: extract pooled features of a frozen backbone once (cached in the run folder),
then a linear probe (lr / weight decay chosen on a validation split of train) and weighted k-NN,
scored on the test split. Results: a table on stdout, probe.json, and TensorBoard."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from selfsup.errors import UserError


def extract_features(backbone, loader, device: str | torch.device = "cpu", desc: str = "features",
                     batches: int | None = None):
    from selfsup.progress import progress_bar

    backbone.eval().to(device)
    if any(p.ndim == 4 for p in backbone.parameters()):  # convolutions: NHWC is faster on CPU and GPU
        backbone.to(memory_format=torch.channels_last)
    feats, labels = [], []
    with torch.no_grad():
        for batch in progress_bar(loader, total=batches, desc=desc, unit="batch"):
            feats.append(backbone(batch["image"].to(device)).float().cpu())
            labels.append(batch["label"])
    return torch.cat(feats), torch.cat(labels)


def probe_config(overrides: list[str], run_cfg: DictConfig | None) -> DictConfig:
    from selfsup.launch.config import _load, config_root, parse_overrides, select_data, set_key

    root = config_root()
    cfg = OmegaConf.merge({"data": _load(root / "defaults.yaml").data}, _load(root / "probe.yaml"))
    pairs = parse_overrides(overrides)
    data_choice = dict(pairs).get("data")
    if data_choice is None and run_cfg is not None and run_cfg.data.name != "shards":
        data_choice = run_cfg.data.name
    if data_choice is None and run_cfg is not None and run_cfg.method.name == "tov_vicreg":
        data_choice = "atari_ram"  # a run on Atari shards: the RAM probe (data.train / data.test name the split folders)
    if data_choice is None and not any(k == "data.test" for k, _ in pairs):
        data_choice = "fashion_mnist"
    if data_choice:
        cfg = select_data(cfg, data_choice)
    if run_cfg is not None:  # probe at the resolution and normalisation the backbone was trained with
        for key in ("image_size", "mean", "std"):
            cfg.data[key] = run_cfg.data[key]
    for key, raw in pairs:
        if key != "data":
            set_key(cfg, key, raw)
    return cfg


@dataclass
class ProbeTarget:
    backbone: torch.nn.Module
    identity: str  # names the weights, for the feature cache
    run_dir: Path | None = None
    run_cfg: DictConfig | None = None
    step: int = 0


class PixelFeatures(torch.nn.Module):
    """The raw-pixel baseline: the normalised image, flattened (one channel when all three are equal,
    as for grayscale data stored as RGB)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 3 and torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2]):
            x = x[:, :1]
        return x.flatten(1)


def load_target(target: str, backbone_kwargs: dict | None = None) -> ProbeTarget:
    """`pixels`, `random:<backbone>` (built with `backbone_kwargs`), a .safetensors export, a .ckpt, or a run folder."""
    from selfsup.backbones import create_backbone

    if target == "pixels":
        return ProbeTarget(PixelFeatures(), "pixels")
    if target.startswith("random:"):
        name = target.split(":", 1)[1]
        torch.manual_seed(0)
        kwargs = dict(backbone_kwargs or {})
        return ProbeTarget(create_backbone(name, **kwargs), f"random:{name}:{json.dumps(kwargs, sort_keys=True)}")
    path = Path(target)
    if path.suffix == ".safetensors":
        from selfsup.export import load_export

        state, meta = load_export(path)
        backbone = create_backbone(meta["backbone"], **json.loads(meta.get("backbone_kwargs") or "{}"))
        backbone.net.load_state_dict(state, strict=True)
        return ProbeTarget(backbone, _file_identity(path), step=int(meta.get("global_step") or 0))
    from selfsup.export import backbone_state_dict, load_checkpoint

    ckpt = load_checkpoint(path)
    meta = ckpt["selfsup"]
    backbone = create_backbone(meta["backbone"], **meta.get("backbone_kwargs", {}))
    backbone.net.load_state_dict(backbone_state_dict(ckpt), strict=True)
    run_dir = path if path.is_dir() else (path.parent.parent if path.parent.name == "checkpoints" else None)
    ckpt_file = path / "checkpoints" / "last.ckpt" if path.is_dir() else path
    return ProbeTarget(backbone, _file_identity(ckpt_file), run_dir,
                       OmegaConf.create(meta["config"]) if meta.get("config") else None, int(ckpt.get("global_step", 0)))


def _file_identity(path: Path) -> str:
    stat = Path(path).stat()
    return f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def probe_features(backbone, cfg: DictConfig, cache_dir: Path | None, identity: str):
    """(train_x, train_y, test_x, test_y), from the cache when this backbone and data were seen."""
    from selfsup.data.stream import eval_loader, resolve_split
    from selfsup.data.views import eval_view

    view = eval_view(cfg.data.image_size, cfg.data.mean, cfg.data.std)
    specs = {split: resolve_split(cfg.data, split) for split in ("train", "test")}
    key = hashlib.sha1(json.dumps([identity, {k: str(v) for k, v in specs.items()}, cfg.data.image_size,
                                   list(cfg.data.mean), list(cfg.data.std)]).encode()).hexdigest()[:16]
    cache = cache_dir / f"features-{key}.pt" if cache_dir else None
    if cache and cache.exists():
        return tuple(torch.load(cache, weights_only=True))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = []
    for split in ("train", "test"):
        loader = eval_loader(specs[split], view, batch_size=cfg.probe.batch_size, num_workers=cfg.data.num_workers)
        batches = split_batches(specs[split], cfg.probe.batch_size)
        out += list(extract_features(backbone, loader, device, desc=f"features {split}", batches=batches))
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save(out, tmp)
        os.replace(tmp, cache)
    return tuple(out)


def split_batches(spec, batch_size: int) -> int | None:
    """Batches of one ordered pass over the shards at `spec` (None when no index.json counts them)."""
    from selfsup.data.stream import count_samples

    samples = count_samples(spec)
    return -(-samples // batch_size) if samples else None


def evaluate(train_x, train_y, test_x, test_y, cfg: DictConfig) -> dict:
    from selfsup.eval.linear import knn_probe, linear_probe

    p = cfg.probe
    if p.train_samples and p.train_samples < len(train_x):
        keep = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(p.seed))[: p.train_samples]
        train_x, train_y = train_x[keep], train_y[keep]
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    linear = linear_probe(train_x, train_y, test_x, test_y, num_classes, max_iter=p.max_iter,
                          val_fraction=p.val_fraction, select_samples=p.select_samples, seed=p.seed,
                          weight_decays=tuple(p.weight_decays))
    knn = knn_probe(train_x, train_y, test_x, test_y, num_classes, k=p.knn_k, temperature=p.knn_temperature)
    return {"linear": linear, "knn": knn, "train_samples": len(train_x), "test_samples": len(test_x),
            "feature_dim": int(train_x.shape[1])}


def format_table(result: dict, title: str) -> str:
    lin, knn = result["linear"], result["knn"]
    return "\n".join([
        f"probe of {title}  ({result['train_samples']} train / {result['test_samples']} test, {result['feature_dim']}-d features)",
        f"  {'':<26}{'top-1':>8}{'top-5':>8}",
        f"  {'linear (chosen on val)':<26}{lin['top1']:>8.2f}{lin['top5']:>8.2f}   wd={lin['chosen']['weight_decay']:g}",
        f"  {'k-NN (k=%d, T=%g)' % (knn['k'], knn['temperature']):<26}{knn['top1']:>8.2f}{knn['top5']:>8.2f}",
    ])


def backbone_kwargs(overrides: list[str]) -> dict:
    """`backbone.kwargs.<k>=<v>` overrides: how to build the backbone of a `random:<backbone>` target
    (e.g. backbone.kwargs.img_size=84 backbone.kwargs.patch_size=8)."""
    from selfsup.launch.config import parse_overrides, parse_value

    prefix = "backbone.kwargs."
    return {k[len(prefix):]: parse_value(v) for k, v in parse_overrides(overrides) if k.startswith(prefix)}


def check_probe(cfg: DictConfig, backbone) -> None:
    """Numbers of the probe config, and the backbone against the image size, before features."""
    from selfsup.backbones.base import Backbone
    from selfsup.launch.validate import check_numbers

    check_numbers(cfg)
    if isinstance(backbone, Backbone):
        backbone.check_image_size(int(cfg.data.image_size))


def run_probe(target: str, overrides: list[str]) -> dict:
    kwargs = backbone_kwargs(overrides)
    if kwargs and not target.startswith("random:"):
        raise UserError("backbone.kwargs.* only applies to random:<backbone> (a trained target carries its own)")
    loaded = load_target(target, kwargs)
    overrides = [o for o in overrides if not o.startswith("backbone.kwargs.")]
    cfg = probe_config(overrides, loaded.run_cfg)
    check_probe(cfg, loaded.backbone)
    from selfsup.eval.atari_ram import ATARI_DATA, run_ram_probe

    if cfg.data.name in ATARI_DATA:
        return run_ram_probe(loaded, cfg, target)
    cache_dir = loaded.run_dir / "probe" if loaded.run_dir else None
    features = probe_features(loaded.backbone, cfg, cache_dir, loaded.identity)
    result = evaluate(*features, cfg)
    result.update({"target": target, "global_step": loaded.step, "data": OmegaConf.to_container(cfg.data),
                   "probe": OmegaConf.to_container(cfg.probe)})
    if loaded.run_dir:
        (loaded.run_dir / "probe.json").write_text(json.dumps(result, indent=1))
        _log_tensorboard(loaded.run_dir, result, loaded.step)
    return result


def _log_tensorboard(run_dir: Path, result: dict, step: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir / "tb")) as writer:
        writer.add_scalar("probe/linear_top1", result["linear"]["top1"], step)
        writer.add_scalar("probe/linear_top5", result["linear"]["top5"], step)
        writer.add_scalar("probe/knn_top1", result["knn"]["top1"], step)


def run_probe_command(target: str, overrides: list[str]) -> int:
    if target != "pixels" and not target.startswith("random:") and not Path(target).exists():
        raise UserError(f"{target!r} does not exist (give a run folder, a .ckpt, a .safetensors export, "
                        "random:<backbone> or pixels)")
    result = run_probe(target, overrides)
    if "mean_f1" in result:
        from selfsup.eval.atari_ram import format_ram_table

        print(format_ram_table(result, target))
    else:
        print(format_table(result, target))
    return 0
