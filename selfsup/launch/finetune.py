"""`submit finetune SOURCE`: full fine-tuning of a backbone with a new classifier on labelled shards,
run like a pretraining run (run folder, resume, TensorBoard, local ranks, Slurm), then scored once on
the test split with the weights that did best on validation.

SOURCE is a run folder, a .ckpt, a .safetensors export or `random:<backbone>` (the same network from
its random init: the baseline a pretrained network must beat at the same budget).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from selfsup.core.config_files import available, config_root, load_config, select_data
from selfsup.core.errors import UserError, unknown_choice
from selfsup.core.overrides import parse_overrides, set_key

RESULT_FILE = "finetune.json"  # in the fine-tuning run's folder
SOURCE_RESULTS = "finetune"  # a source run's folder of the results of its fine-tuning runs
GROUPS = ("data", "cluster", "strategy")
LABELLED = "labelled"  # in the run folder: the validation split's shards (and a label fraction's)
SOURCE_DATA_KEYS = ("image_size", "mean", "std")  # fine-tune as the source was trained


def source_info(source: str) -> dict:
    """The backbone (name, kwargs) that SOURCE holds and the data config it was trained on (None for
    random:<backbone> and an export)."""
    if source.startswith("random:"):
        from selfsup.backbones import get_spec

        name = source.split(":", 1)[1]
        get_spec(name)
        return {"backbone": name, "kwargs": {}, "data": None}
    path = Path(source)
    if not path.exists():
        raise UserError(f"{source!r} does not exist (give a run folder, a .ckpt, a .safetensors export or "
                        "random:<backbone>)")
    from selfsup.core.run_folder import is_run_folder, load_run_config

    if is_run_folder(path):
        run = load_run_config(path)
        return {"backbone": run.backbone.name, "kwargs": OmegaConf.to_container(run.backbone.kwargs),
                "data": run.data}
    if path.suffix == ".safetensors":
        from selfsup.export import load_export

        _, meta = load_export(path)
        return {"backbone": meta["backbone"], "kwargs": json.loads(meta.get("backbone_kwargs") or "{}"), "data": None}
    from selfsup.export import load_checkpoint

    meta = load_checkpoint(path)["selfsup"]
    config = meta.get("config")
    return {"backbone": meta["backbone"], "kwargs": dict(meta.get("backbone_kwargs") or {}),
            "data": OmegaConf.create(config).data if config else None}


def compose(source: str, overrides: list[str]) -> DictConfig:
    """defaults -> finetune.yaml -> finetune/<recipe>.yaml -> data -> cluster -> strategy -> key=value."""
    pairs = parse_overrides(overrides)
    chosen = dict(pairs)
    info = source_info(source)
    root = config_root()
    recipe = chosen.get("finetune.recipe", "cpu")
    if recipe not in available("finetune"):
        raise unknown_choice("fine-tuning recipe (finetune.recipe)", recipe, available("finetune"))
    cfg = OmegaConf.merge(load_config(root / "defaults.yaml"), load_config(root / "finetune.yaml"),
                          load_config(root / "finetune" / f"{recipe}.yaml"))
    cfg.backbone.name = info["backbone"]
    cfg.backbone.kwargs = info["kwargs"]
    data = chosen.get("data")
    if data is None and info["data"] is not None and info["data"].name != "shards":
        data = info["data"].name  # the source's own built-in data
    if data is None and "data.train" not in chosen:
        data = cfg.data.name
    if data is not None:
        cfg = select_data(cfg, data)
    if info["data"] is not None:  # the resolution and normalisation the backbone was trained with
        for key in SOURCE_DATA_KEYS:
            cfg.data[key] = info["data"][key]
    for group in ("cluster", "strategy"):
        name = chosen.get(group, cfg[group].name)
        if name not in available(group):
            raise unknown_choice(group, name, available(group))
        cfg = OmegaConf.merge(cfg, load_config(root / group / f"{name}.yaml"))
    for key, raw in pairs:
        if key not in GROUPS:
            set_key(cfg, key, raw)
    cfg.finetune.source = source
    cfg.finetune.recipe = recipe
    if cfg.run_name is None:
        cfg.run_name = f"finetune-{source_name(source)}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg


def source_name(source: str) -> str:
    if source.startswith("random:"):
        return "random-" + source.split(":", 1)[1]
    path = Path(source)
    if path.name in ("last.ckpt", "best.ckpt") and path.parent.name == "checkpoints":
        path = path.parent.parent
    return path.stem if path.suffix else path.name


def check_finetune(cfg: DictConfig) -> None:
    """A config that cannot run: one line, before the run folder."""
    from selfsup.backbones.meta import meta_backbone
    from selfsup.launch.validate import check_choices, check_devices, check_numbers, check_optimizer_name, check_run_length

    check_numbers(cfg)
    check_choices(cfg)
    check_run_length(cfg.trainer)
    check_devices(cfg.trainer)
    check_optimizer_name(str(cfg.optim.name))
    meta_backbone(cfg).check_image_size(int(cfg.data.image_size))
    f = cfg.finetune
    if not 0 < f.label_fraction <= 1:
        raise UserError(f"finetune.label_fraction={f.label_fraction}: give a fraction in (0, 1], e.g. 0.01 or 0.1")
    if not 0 < f.layer_decay <= 1:
        raise UserError(f"finetune.layer_decay={f.layer_decay}: give a factor in (0, 1] (1.0: no decay)")
    for key in ("val_samples", "val_every_n_steps", "test_batch_size"):
        if f[key] < (0 if key == "val_samples" else 1):
            raise UserError(f"finetune.{key}={f[key]}: give a positive number")
    for key in ("label_smoothing", "drop_path", "mixup", "cutmix"):
        if f[key] < 0 or (key in ("label_smoothing", "drop_path") and f[key] >= 1):
            raise UserError(f"finetune.{key}={f[key]}: give a value in [0, 1)" if key in ("label_smoothing", "drop_path")
                            else f"finetune.{key}={f[key]}: give an alpha >= 0 (0: off)")
    if (f.mixup or f.cutmix) and cfg.data.batch_size % 2:
        raise UserError(f"data.batch_size={cfg.data.batch_size}: mixup and cutmix pair the batch, give an even size")
    from selfsup.data.stream import resolve_split

    for split in ("train", "test"):
        resolve_split(cfg.data, split)


def prepare_kwargs(cfg: DictConfig, num_classes: int) -> None:
    """The backbone's kwargs of the fine-tuned network: timm's classifier, and stochastic depth."""
    cfg.backbone.kwargs.num_classes = num_classes
    if cfg.finetune.drop_path > 0:
        cfg.backbone.kwargs.drop_path_rate = float(cfg.finetune.drop_path)


def class_count(cfg: DictConfig) -> int:
    """Classes of the labelled train shards: from their index.json, else from a pass over their labels."""
    from selfsup.data.stream import dataset_classes, resolve_split, sample_labels

    spec = resolve_split(cfg.data, "train")
    classes = dataset_classes(spec)
    if classes:
        return len(classes)
    labels = [label for label in sample_labels(spec, cfg.data.num_workers)[1] if label >= 0]
    if not labels:
        raise UserError(f"the train shards at {spec!r} carry no class labels (cls): fine-tuning needs labelled shards")
    return max(labels) + 1


def load_source_weights(module, source: str) -> None:
    """Copy SOURCE's backbone weights into the network; only its new classifier may be left out."""
    if source.startswith("random:"):
        return  # the network's own random init (seeded by the run's seed)
    from selfsup.eval.probe import load_backbone

    state = load_backbone(source).backbone.net.state_dict()
    net = module.backbone.net
    # a fine-tuned source carries a classifier: one made for other classes is not loaded
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    head_names = [name for name, m in net.named_modules() if head is not None and m is head and name]
    own = net.state_dict()
    state = {k: v for k, v in state.items()
             if not (k in own and v.shape != own[k].shape and any(k.startswith(h + ".") for h in head_names))}
    shapes = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if shapes:
        raise UserError(f"{source}: its weights do not fit {module.backbone.name} ({shapes[0]}: "
                        f"{tuple(state[shapes[0]].shape)} against {tuple(own[shapes[0]].shape)}); fine-tune a "
                        f"source of the same backbone and backbone.kwargs")
    missing, unexpected = net.load_state_dict(state, strict=False)
    new_head = {key for key in net.state_dict() if key not in state}  # the classifier, made for these classes
    if unexpected or set(missing) - new_head:
        raise UserError(f"{source}: its weights do not fit {module.backbone.name} "
                        f"({len(unexpected)} unexpected, {len(set(missing) - new_head)} missing keys)")


def run_finetune(cfg: DictConfig, run_dir: str | Path, extra_callbacks=(), on_signal=None, signal_flag=None) -> dict:
    """Fine-tune in `run_dir` (resuming from its last checkpoint), then score the best weights on test."""
    from selfsup.core.config_checks import configured_ranks
    from selfsup.data.stream import ShardDataModule, eval_loader, resolve_split, write_subset
    from selfsup.data.views import eval_view
    from selfsup.eval.finetune import FineTuner
    from selfsup.eval.label_subset import load_or_draw
    from selfsup.launch.checkpointing import resolve_last
    from selfsup.launch.train import fit_run

    run_dir = Path(run_dir)
    f, d = cfg.finetune, cfg.data
    train_spec = resolve_split(d, "train")
    subset = load_or_draw(run_dir, train_spec, fraction=float(f.label_fraction),
                          val_samples=int(f.val_samples), seed=int(f.subset_seed), num_workers=d.num_workers)
    view = eval_view(d.image_size, d.mean, d.std)
    val_spec = write_subset(train_spec, frozenset(subset.val), run_dir / LABELLED / "val", prefix="val",
                            num_workers=d.num_workers) if subset.val else None
    built = {}

    def build(cfg: DictConfig):
        module = FineTuner(cfg, num_classes=int(cfg.backbone.kwargs.num_classes))
        if resolve_last(run_dir / "checkpoints") is None:
            load_source_weights(module, f.source)
        module.best_dir = run_dir / "checkpoints"
        if val_spec is not None:
            module.val_batches = list(eval_loader(str(val_spec), view, batch_size=f.test_batch_size, num_workers=0))
        if f.label_fraction < 1:  # a fraction of the labels: its own shards, read without a pass over all of them
            train_data = OmegaConf.merge(d, {"train": str(write_subset(
                train_spec, frozenset(subset.train), run_dir / LABELLED / "train", prefix="train",
                num_workers=d.num_workers, readers=(configured_ranks(cfg.trainer) or 1) * max(1, d.num_workers))),
                "epoch_samples": None})
            datamodule = ShardDataModule(train_data, train_view=module.train_view(), seed=cfg.seed)
        else:  # all the labels: the train shards, less the validation split
            datamodule = ShardDataModule(d, train_view=module.train_view(), seed=cfg.seed, keys=frozenset(subset.train))
        built["module"] = module
        return module, datamodule

    result = fit_run(cfg, run_dir, build, extra_callbacks=extra_callbacks, on_signal=on_signal, signal_flag=signal_flag)
    module = built["module"]
    if result["ended_by"] or result["interrupted"] or module.global_rank != 0:
        return result
    test = score_best(module, run_dir, eval_loader(resolve_split(d, "test"), view, batch_size=f.test_batch_size,
                                                   num_workers=d.num_workers))
    record = {**test, "val_top1": module.best.get("val_top1"), "best_step": module.best.get("step"),
              "steps": result["global_step"], "label_fraction": float(f.label_fraction),
              "labelled_samples": len(subset.train), "val_samples": len(subset.val), "num_classes": subset.num_classes,
              "source": str(f.source), "backbone": cfg.backbone.name, "recipe": str(f.recipe), "seed": int(cfg.seed),
              "run": str(run_dir), "data": d.name if d.name != "shards" else str(d.train)}
    write_result(run_dir, record)
    export_best(module, run_dir)
    result["finetune"] = record
    return result


def score_best(module, run_dir: Path, test_batches) -> dict:
    """Top-1 / top-5 on test of the weights that did best on validation (the last ones if none was saved)."""
    import torch

    from selfsup.eval.finetune import BEST_WEIGHTS, classify

    best = run_dir / "checkpoints" / BEST_WEIGHTS
    if best.exists():
        module.load_state_dict(torch.load(best, map_location="cpu", weights_only=True))
    module.eval()
    scores = classify(module, test_batches, module.device)
    return {"top1": scores["top1"], "top5": scores["top5"], "test_samples": scores["samples"]}


def write_result(run_dir: Path, record: dict) -> None:
    """finetune.json in the run folder, and a copy in the source run's finetune/ folder."""
    from selfsup.core.atomic import write_text_atomic
    from selfsup.core.run_folder import is_run_folder

    text = json.dumps(record, indent=1)
    write_text_atomic(run_dir / RESULT_FILE, text)
    source = Path(record["source"])
    source_run = source.parent.parent if source.suffix == ".ckpt" and source.parent.name == "checkpoints" else source
    if not record["source"].startswith("random:") and is_run_folder(source_run):
        write_text_atomic(source_run / SOURCE_RESULTS / f"{run_dir.name}.json", text)


def export_best(module, run_dir: Path) -> Path:
    """The fine-tuned network (classifier included) as timm-ready safetensors: `model.safetensors`."""
    import torch

    from selfsup.core.atomic import write_atomic
    from selfsup.export import export_backbone

    checkpoint = {"state_dict": module.state_dict(), "global_step": int(module.best.get("step", -1)), "selfsup": {}}
    module.on_save_checkpoint(checkpoint)
    best_ckpt = run_dir / "checkpoints" / "best.ckpt"
    write_atomic(best_ckpt, lambda temporary: torch.save(checkpoint, temporary))
    return export_backbone(best_ckpt, run_dir / "model.safetensors")
