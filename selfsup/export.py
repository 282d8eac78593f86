"""Checkpoint -> `.safetensors` holding only the backbone, with timm's key names.

The test of an export is `timm.create_model(timm_name, num_classes=0, **timm_kwargs)` followed by
`load_state_dict(weights, strict=True)`; `create_timm_model_from_export` does exactly that.

`export_hf` writes a Hugging Face hub folder instead (`config.json`, `model.safetensors`, `README.md`),
which `timm.create_model("local-dir:FOLDER", pretrained=True)` loads with nothing else given.

Accepted sources: a run folder (its `checkpoints/last.ckpt`), a Lightning `.ckpt` file, or a
DeepSpeed ZeRO checkpoint folder (what Lightning's DeepSpeed strategy writes in place of a file).
Every problem with a source is a one-line `UserError` naming the path.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfsup.core.atomic import write_atomic, write_folder_atomic, write_text_atomic
from selfsup.core.errors import UserError, unknown_choice
from selfsup.core.run_folder import CONFIG_FILE, is_run_folder, load_run_config

FORMATS = ("timm", "torchvision")  # a .safetensors file (export_backbone)
HF_FORMAT = "hf"  # a Hugging Face hub folder (export_hf)
EXPORT_FORMATS = (*FORMATS, HF_FORMAT)
BACKBONE_PREFIX = "backbone.net."
# Lightning < 2.1 wrapped the LightningModule as `_forward_module`, DDP/DeepSpeed engines as `module`
WRAPPER_PREFIXES = ("_forward_module.", "module.")
REQUIRED_SELFSUP_KEYS = ("method", "backbone", "backbone_kwargs", "timm_name", "timm_kwargs", "config_hash")
# timm names of selfsup's own networks, which timm knows once selfsup.backbones.register_timm_models has run
SELFSUP_TIMM_PREFIX = "selfsup_"
RUN_CHECKPOINT = Path("checkpoints") / "last.ckpt"
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL_OPCODE = b"\x80"

# timm's plain ResNets keep torchvision's parameter names (tests/test_export.py holds them equal), so
# converting is a check that the architecture matches, not a renaming.
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
TORCHVISION_CLASSIFIER_KEYS = frozenset({"fc.weight", "fc.bias"})


# ---------------------------------------------------------------------------------------------
# Loading checkpoints


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a selfsup checkpoint (run folder, `.ckpt` file or ZeRO folder) onto the CPU and check
    that it carries selfsup's metadata."""
    source = _resolve_checkpoint_path(Path(path))
    if source.is_dir():
        checkpoint = _load_zero_checkpoint(source)
    else:
        checkpoint = _load_checkpoint_file(source)
    _check_selfsup_checkpoint(checkpoint, source)
    return checkpoint


def _resolve_checkpoint_path(path: Path) -> Path:
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_file():
        return path
    run_checkpoint = path / RUN_CHECKPOINT
    if run_checkpoint.exists():  # a file, or a ZeRO folder when the run used DeepSpeed
        return run_checkpoint
    if _is_zero_checkpoint_folder(path):
        return path
    if any(path.glob("*_model_states.pt")):
        raise UserError(
            f"{path}: this is the inside of a DeepSpeed checkpoint; pass the folder above it (the one with a 'latest' file)"
        )
    raise UserError(
        f"{path}: a folder that is neither a run folder (no {RUN_CHECKPOINT}) nor a DeepSpeed checkpoint (no 'latest' file)"
    )


def _is_zero_checkpoint_folder(path: Path) -> bool:
    # DeepSpeed names the newest tag (Lightning always uses the tag "checkpoint") in a file `latest`
    return (path / "latest").is_file()


def _weights_only_allowlist() -> list[Any]:
    """Types that `torch.load(weights_only=True)` refuses by default but that a selfsup checkpoint
    may legitimately hold: a `pathlib` path, and an OmegaConf config passed to
    `save_hyperparameters` (Lightning stores it as it is). Each only rebuilds plain data."""
    import collections
    import pathlib
    import typing

    allowed: list[Any] = [pathlib.PosixPath, pathlib.WindowsPath, collections.defaultdict]
    allowed += [dict, list, int, float, str, bool, typing.Any]  # OmegaConf records these as node types
    try:
        from omegaconf import DictConfig, ListConfig, base, nodes
    except ImportError:
        return allowed
    allowed += [DictConfig, ListConfig, base.ContainerMetadata, base.Metadata]
    allowed += [nodes.AnyNode, nodes.StringNode, nodes.IntegerNode, nodes.FloatNode, nodes.BooleanNode]
    return allowed


def _load_checkpoint_file(path: Path) -> dict[str, Any]:
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty")
    with open(path, "rb") as file:
        head = file.read(4)
    is_zip = head == ZIP_MAGIC  # torch.save's format; older torch wrote a bare pickle
    if not (is_zip or head.startswith(PICKLE_PROTOCOL_OPCODE)):
        raise UserError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        with torch.serialization.safe_globals(_weights_only_allowlist()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(_describe_unpickling_error(path, error, is_zip)) from None
    except Exception as error:  # decoding damaged bytes fails in many ways, all of them a bad file
        what = "a truncated or corrupt PyTorch checkpoint" if is_zip else "not a readable PyTorch checkpoint"
        raise UserError(f"{path}: {what} ({type(error).__name__}: {_first_line(error)})") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path}: holds a {type(checkpoint).__name__}, not a Lightning checkpoint (a dict)")
    return checkpoint


def _describe_unpickling_error(path: Path, error: Exception, is_zip: bool) -> str:
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if refused:
        return (
            f"{path}: holds a {refused.group(1)} object, which safe (weights_only) loading refuses; "
            "store plain data (dicts, lists, numbers, strings, tensors) in checkpoints"
        )
    # torch wraps the unpickler's own complaint in a paragraph of advice; keep the complaint
    cause = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
    reason = cause.group(1).strip() if cause else _first_line(error)
    what = "a corrupt PyTorch checkpoint" if is_zip else "not a PyTorch checkpoint"
    return f"{path}: {what} ({reason})"


def _load_zero_checkpoint(folder: Path) -> dict[str, Any]:
    """Consolidate a ZeRO checkpoint with Lightning's converter, which returns Lightning's
    checkpoint dict (the `state_dict` wrapper included). DeepSpeed's own files pickle DeepSpeed
    objects, so the converter loads them with weights_only=False: convert only checkpoints you trust."""
    try:
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
    except ImportError as error:
        raise UserError(f"{folder}: converting a DeepSpeed checkpoint needs lightning ({_first_line(error)})") from None
    # the converter must write its result to a file; the export needs only the returned dict
    with tempfile.TemporaryDirectory(prefix="selfsup-zero-") as scratch:
        try:
            with contextlib.redirect_stdout(sys.stderr):  # it prints progress; keep stdout for results
                checkpoint = convert_zero_checkpoint_to_fp32_state_dict(folder, Path(scratch) / "fp32.ckpt")
        except ModuleNotFoundError as error:
            raise UserError(f"{folder}: converting a DeepSpeed checkpoint needs deepspeed ({_first_line(error)})") from None
        except Exception as error:  # a damaged or foreign folder fails in many ways inside deepspeed
            raise UserError(
                f"{folder}: not a readable DeepSpeed ZeRO checkpoint ({type(error).__name__}: {_first_line(error)})"
            ) from None
    return checkpoint


def _check_selfsup_checkpoint(checkpoint: Mapping[str, Any], path: Path) -> None:
    meta = checkpoint.get("selfsup")
    if not isinstance(meta, Mapping):
        raise UserError(f"{path}: no selfsup metadata (checkpoint['selfsup']); was it written by selfsup?")
    missing = [key for key in REQUIRED_SELFSUP_KEYS if key not in meta]
    if missing:
        raise UserError(f"{path}: selfsup metadata lacks {', '.join(missing)}")
    if not isinstance(checkpoint.get("state_dict"), Mapping):
        raise UserError(f"{path}: no 'state_dict' in the checkpoint")
    if not isinstance(checkpoint.get("global_step"), int):
        raise UserError(f"{path}: no integer 'global_step' in the checkpoint")


def _first_line(error: BaseException, max_chars: int = 160) -> str:
    """The gist of an exception's message, on one line: its first line, cut at a sentence end
    when that line is long (torch appends paragraphs of advice)."""
    text = (str(error).strip() or type(error).__name__).splitlines()[0].strip()
    if len(text) > max_chars and ". " in text:
        text = text[: text.index(". ") + 1]
    return text


# ---------------------------------------------------------------------------------------------
# Selecting and converting the backbone's weights


def backbone_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone's weights from a selfsup checkpoint, under exactly timm's key names."""
    weights = {}
    for key, tensor in checkpoint["state_dict"].items():
        key = _strip_wrapper_prefixes(key)
        if key.startswith(BACKBONE_PREFIX):
            weights[key[len(BACKBONE_PREFIX) :]] = tensor
    if not weights:
        raise UserError(f"the checkpoint holds no backbone weights (no keys under {BACKBONE_PREFIX!r})")
    return weights


def _strip_wrapper_prefixes(key: str) -> str:
    stripped = True
    while stripped:  # wrappers nest (e.g. `module._forward_module.`)
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def to_torchvision(state_dict: Mapping[str, torch.Tensor], timm_name: str) -> dict[str, torch.Tensor]:
    """timm ResNet weights -> `torchvision.models.<timm_name>` weights (all but the classifier `fc`).

    The names are the same; what this checks is that every tensor has a place of the same shape in
    torchvision's network, so that a ResNet built with other options (e.g. in_chans=1) is refused."""
    if timm_name not in TORCHVISION_RESNETS:
        raise UserError(
            f"torchvision format exists only for timm's plain ResNets ({', '.join(TORCHVISION_RESNETS)}), "
            f"not {timm_name!r}: export with format 'timm'"
        )
    mismatch = _state_dict_mismatch(_torchvision_shapes(timm_name), state_dict, TORCHVISION_CLASSIFIER_KEYS)
    if mismatch:
        raise UserError(f"these {timm_name} weights do not fit torchvision.models.{timm_name}: {mismatch}")
    return dict(state_dict)


def _torchvision_shapes(model_name: str) -> dict[str, tuple[int, ...]]:
    import torchvision

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = getattr(torchvision.models, model_name)()
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


def load_into_torchvision(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Load backbone weights into a torchvision ResNet: strict except for the classifier `fc`,
    which a backbone does not have. Returns the keys left missing (the classifier's)."""
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    mismatch = _state_dict_mismatch(expected, state_dict, TORCHVISION_CLASSIFIER_KEYS)
    if mismatch:
        raise UserError(f"the weights do not fit this torchvision {type(model).__name__}: {mismatch}")
    return sorted(model.load_state_dict(state_dict, strict=False).missing_keys)


def _state_dict_mismatch(
    expected_shapes: Mapping[str, tuple[int, ...]], weights: Mapping[str, torch.Tensor], may_miss: frozenset[str] = frozenset()
) -> str:
    """'' when `weights` fill exactly the expected keys with the expected shapes (bar `may_miss`),
    else a one-line summary of what does not fit."""
    missing = sorted(set(expected_shapes) - set(weights) - may_miss)
    unexpected = sorted(set(weights) - set(expected_shapes))
    wrong_shape = sorted(k for k in set(weights) & set(expected_shapes) if tuple(weights[k].shape) != expected_shapes[k])
    return _mismatch_summary(missing=missing, unexpected=unexpected, wrong_shape=wrong_shape)


def _mismatch_summary(**problems: list[str]) -> str:
    return "; ".join(
        f"{len(keys)} {kind.replace('_', ' ')} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        for kind, keys in problems.items()
        if keys
    )


# ---------------------------------------------------------------------------------------------
# Writing and reading exports


def export_backbone(src: str | os.PathLike, out_path: str | os.PathLike, fmt: str = "timm") -> Path:
    """Write the backbone of checkpoint `src` to `out_path` (`.safetensors`) in format `fmt`
    ("timm" or "torchvision"); returns the path written."""
    if fmt not in FORMATS:
        raise unknown_choice("export format", fmt, FORMATS)
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise UserError(
            f"{out_path}: the export is a safetensors file; name it *.safetensors (or give --format {HF_FORMAT} for a folder)"
        )
    checkpoint = load_checkpoint(src)
    selfsup_meta = checkpoint["selfsup"]
    weights = _backbone_weights(checkpoint, src)
    if fmt == "torchvision":
        weights = to_torchvision(weights, selfsup_meta["timm_name"])
    metadata = _export_metadata(selfsup_meta, checkpoint["global_step"], fmt)
    _write_safetensors_atomically(weights, out_path, metadata)
    return out_path


def _backbone_weights(checkpoint: Mapping[str, Any], src: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        return backbone_state_dict(checkpoint)
    except UserError as error:
        raise UserError(f"{src}: {error}") from None


def _export_metadata(selfsup_meta: Mapping[str, Any], global_step: int, fmt: str) -> dict[str, str]:
    try:  # safetensors metadata is str -> str; the kwargs travel as JSON
        timm_kwargs = json.dumps(dict(selfsup_meta["timm_kwargs"]), sort_keys=True)
        backbone_kwargs = json.dumps(dict(selfsup_meta["backbone_kwargs"]), sort_keys=True)
    except TypeError as error:
        raise UserError(f"the backbone's construction arguments are not JSON data: {_first_line(error)}") from None
    return {
        "method": str(selfsup_meta["method"]),
        "backbone": str(selfsup_meta["backbone"]),
        "backbone_kwargs": backbone_kwargs,
        "timm_name": str(selfsup_meta["timm_name"]),
        "timm_kwargs": timm_kwargs,
        "global_step": str(int(global_step)),
        "config_hash": str(selfsup_meta["config_hash"]),
        "format": fmt,
    }


def _with_classes(timm_kwargs: dict[str, Any]) -> dict[str, Any]:
    """timm's constructor arguments: no classifier unless the network was fine-tuned with one."""
    return {"num_classes": 0, **timm_kwargs}


def _write_safetensors_atomically(weights: Mapping[str, torch.Tensor], out_path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    # each tensor gets its own contiguous storage: safetensors refuses tensors that share memory (tied
    # weights, which ZeRO's converter also returns as one tensor under two names)
    tensors = {key: tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format) for key, tensor in weights.items()}
    write_atomic(out_path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def load_export(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(weights, metadata) of an export written by `export_backbone`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt", device="cpu") as file:
            metadata = dict(file.metadata() or {})
            weights = {key: file.get_tensor(key) for key in file.keys()}
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path}: not a readable safetensors file ({_first_line(error)})") from None
    missing = [key for key in ("timm_name", "timm_kwargs", "format") if key not in metadata]
    if missing:
        raise UserError(f"{path}: not a selfsup export (metadata lacks {', '.join(missing)})")
    return weights, metadata


def create_timm_model_from_export(path: str | os.PathLike) -> nn.Module:
    """The timm network of an export (no classifier, unless it is a fine-tuned network's), with its weights loaded strictly. Takes either
    format: the ResNets that the torchvision format allows have timm's names too."""
    import timm

    weights, metadata = load_export(path)
    timm_name = metadata["timm_name"]
    if timm_name.startswith(SELFSUP_TIMM_PREFIX):
        from selfsup.backbones import register_timm_models

        register_timm_models()
    model = timm.create_model(timm_name, pretrained=False, **_with_classes(json.loads(metadata["timm_kwargs"])))
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError:  # torch's message runs over many lines; say what does not fit in one
        expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
        raise UserError(
            f"{path}: the weights do not fit timm's {timm_name}: {_state_dict_mismatch(expected, weights)}"
        ) from None
    return model


# ---------------------------------------------------------------------------------------------
# Hugging Face hub folders
#
# The layout is the one timm's hub loader reads (timm.models._hub.load_model_config_from_path, for
# `local-dir:` and `hf-hub:` names): config.json holds `architecture` (the timm name), `num_classes`,
# `model_args` (the constructor kwargs) and `pretrained_cfg` (input size, normalisation, resizing),
# and model.safetensors the weights under timm's key names.

HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
HF_CARD = "README.md"
# selfsup's eval view (selfsup/data/views.py: eval_view) resizes the shorter side to the image size
# (bilinear) and crops the centre: in timm's terms a crop_pct of 1.0
EVAL_INTERPOLATION = "bilinear"
EVAL_CROP_PCT = 1.0
# the keys of a network's own pretrained config that describe its architecture (what timm needs to
# adapt the stem or the classifier); the rest describes timm's ImageNet weights, not these
ARCHITECTURE_CFG_KEYS = ("fixed_input_size", "first_conv", "classifier")
RUN_DATA_KEYS = ("image_size", "mean", "std")


def run_folder_of(src: str | os.PathLike) -> Path | None:
    """The run folder that checkpoint source `src` belongs to: `src` itself, or the folder above
    its `checkpoints/` (a `last.ckpt` file or ZeRO folder given directly); None for a loose checkpoint."""
    path = Path(src)
    if is_run_folder(path):
        return path
    if path.parent.name == RUN_CHECKPOINT.parent.name and is_run_folder(path.parent.parent):
        return path.parent.parent
    return None


def check_hf_folder(out_dir: str | os.PathLike, force: bool = False) -> Path:
    """A UserError unless `out_dir` can take a new export folder: missing, empty, or (with `force`)
    a folder with files in it."""
    out_dir = Path(out_dir)
    if out_dir.suffix == ".safetensors":
        raise UserError(f"{out_dir}: --format {HF_FORMAT} writes a folder; name it without .safetensors")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: a file is in the way; --format {HF_FORMAT} writes a folder there")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise UserError(f"{out_dir}: the folder has files in it; pass --force to replace it, or name a new folder")
    return out_dir


def export_hf(src: str | os.PathLike, out_dir: str | os.PathLike, *, force: bool = False,
              probe_tables: Sequence[str] = ()) -> Path:
    """Write the backbone of checkpoint `src` as a Hugging Face hub folder `out_dir`: config.json,
    model.safetensors (with the same metadata as `export_backbone`'s file) and README.md, a model card
    that shows `probe_tables` (the tables `submit probe` printed for the run). The folder is filled
    beside `out_dir` and renamed into place. Returns `out_dir`."""
    out_dir = check_hf_folder(out_dir, force)
    checkpoint = load_checkpoint(src)
    selfsup_meta = checkpoint["selfsup"]
    weights = _backbone_weights(checkpoint, src)
    run_cfg = _run_config(checkpoint, src)
    model = _timm_network(selfsup_meta, weights, src)
    config = hf_config(model, selfsup_meta, run_cfg["data"])
    card = model_card(selfsup_meta, run_cfg, checkpoint["global_step"], config, out_dir, probe_tables)
    metadata = _export_metadata(selfsup_meta, checkpoint["global_step"], HF_FORMAT)

    def fill(folder: Path) -> None:
        _write_safetensors_atomically(weights, folder / HF_WEIGHTS, metadata)
        write_text_atomic(folder / HF_CONFIG, json.dumps(config, indent=2) + "\n")
        write_text_atomic(folder / HF_CARD, card)

    return write_folder_atomic(out_dir, fill, replace=force)


def _run_config(checkpoint: Mapping[str, Any], src: str | os.PathLike) -> dict[str, Any]:
    """The config the run trained with: the one its checkpoints record, else its folder's config.yaml."""
    from omegaconf import OmegaConf

    recorded = checkpoint["selfsup"].get("config")
    run = run_folder_of(src)
    if isinstance(recorded, Mapping):
        cfg, where = dict(recorded), f"{src}: the checkpoint's config"
    elif run is not None:
        cfg, where = OmegaConf.to_container(load_run_config(run), resolve=True), str(run / CONFIG_FILE)
    else:
        raise UserError(
            f"{src}: the checkpoint records no config and is not in a run folder (no {CONFIG_FILE}); "
            f"--format {HF_FORMAT} needs the run's image size and normalisation: export the run folder"
        )
    data = cfg.get("data")
    missing = [key for key in RUN_DATA_KEYS if not isinstance(data, Mapping) or data.get(key) is None]
    if missing:
        raise UserError(f"{where} lacks {', '.join('data.' + key for key in missing)}")
    return cfg


def _timm_network(selfsup_meta: Mapping[str, Any], weights: Mapping[str, torch.Tensor], src: str | os.PathLike) -> nn.Module:
    """The network timm builds from the export's config, on the meta device (shapes only), once
    checked to take exactly these weights and to load pretrained weights the way timm's own do."""
    import timm

    from selfsup.backbones import backbone_names, get_spec, register_timm_models

    timm_name = str(selfsup_meta["timm_name"])
    register_timm_models()
    if not timm.is_model(timm_name):
        can = [name for name in backbone_names() if timm.is_model(get_spec(name).timm_name)]
        raise UserError(
            f"{src}: timm cannot build {selfsup_meta['backbone']!r} (timm name {timm_name!r}); "
            f"--format {HF_FORMAT} exports these backbones: {', '.join(can)}"
        )
    with torch.device("meta"):  # shapes and the pretrained config only: no memory, no initialisation cost
        model = timm.create_model(timm_name, pretrained=False, **_with_classes(dict(selfsup_meta["timm_kwargs"])))
    if not isinstance(getattr(model, "pretrained_cfg", None), Mapping):
        # a network built without timm's build_model_with_cfg ignores pretrained=True: its folder would
        # load with random weights
        raise UserError(
            f"{src}: timm builds {timm_name!r} without a pretrained config, so `pretrained=True` would not load "
            f"its weights; export it with --format timm"
        )
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    mismatch = _state_dict_mismatch(expected, weights)
    if mismatch:
        raise UserError(f"{src}: the weights do not fit timm's {timm_name}: {mismatch}")
    return model


def hf_config(model: nn.Module, selfsup_meta: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """config.json: timm's network (with the classifier of a fine-tuned one), fed as selfsup's eval view fed it."""
    from timm.models import PretrainedCfg

    model_args = json.loads(json.dumps(dict(selfsup_meta["timm_kwargs"])))  # tuples -> lists, as JSON has them
    num_classes = int(model_args.pop("num_classes", 0))
    size = int(data["image_size"])
    pretrained_cfg = {key: model.pretrained_cfg[key] for key in ARCHITECTURE_CFG_KEYS if key in model.pretrained_cfg}
    pretrained_cfg.update(
        input_size=[int(model_args.get("in_chans", 3)), size, size],
        interpolation=EVAL_INTERPOLATION,
        crop_pct=EVAL_CROP_PCT,
        crop_mode="center",
        mean=[float(m) for m in data["mean"]],
        std=[float(s) for s in data["std"]],
        num_classes=num_classes,
    )
    PretrainedCfg(**pretrained_cfg)  # every key is one this timm knows
    return {
        "architecture": str(selfsup_meta["timm_name"]),
        "num_classes": num_classes,
        "num_features": int(model.num_features),
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
    }


def model_card(selfsup_meta: Mapping[str, Any], run_cfg: Mapping[str, Any], global_step: int,
               config: Mapping[str, Any], out_dir: Path, probe_tables: Sequence[str] = ()) -> str:
    """README.md: what the weights are, how they were trained and scored, and how to load them."""
    import timm

    from selfsup.ssl import METHODS

    method, backbone, arch = str(selfsup_meta["method"]), str(selfsup_meta["backbone"]), config["architecture"]
    entry = METHODS.get(method)
    method_text = f"`{method}` ({entry.summary})" if entry else f"`{method}`"
    data = run_cfg["data"]
    data_text = f"`{data.get('name')}`" + (f" (`{data['train']}`)" if data.get("train") else "")
    channels, height, width = config["pretrained_cfg"]["input_size"]
    trainer = run_cfg.get("trainer") or {}
    devices = int(trainer.get("devices") or 1) * int(trainer.get("num_nodes") or 1)
    registering = timm.models.model_entrypoint(arch).__module__
    import_line = f"import {registering}  # registers {arch} with timm\n" if not registering.startswith("timm.") else ""
    lines = [
        "---",
        "library_name: timm",
        "tags:",
        "- image-feature-extraction",
        "- timm",
        "- self-supervised",
        "- selfsup",
        "---",
        "",
        f"# {backbone} pretrained with {method}",
        "",
        f"A backbone pretrained by self-supervision with selfsup, as timm's `{arch}` without a classifier: "
        f"an image in, a {config['num_features']}-d feature vector out.",
        "",
        "| | |",
        "|---|---|",
        f"| method | {method_text} |",
        f"| backbone | `{backbone}`{_inline_json(selfsup_meta['backbone_kwargs'])}: timm's `{arch}`"
        f"{_inline_json(config['model_args'])} |",
        f"| data | {data_text} |",
        f"| input | {channels} x {height} x {width} px, resized (shorter side, bilinear) and centre-cropped, "
        f"mean{_inline_json(config['pretrained_cfg']['mean'])}, std{_inline_json(config['pretrained_cfg']['std'])} |",
        f"| steps trained | {int(global_step)} (batch size {data.get('batch_size')} per device, {devices} "
        f"device{'s' if devices != 1 else ''}) |",
        f"| config hash | `{selfsup_meta['config_hash']}` |",
        "",
        "## Probe results",
        "",
    ]
    if probe_tables:
        lines.append("A linear probe and k-NN on the frozen features (`submit probe`):")
        for table in probe_tables:
            lines += ["", "```text", table.rstrip("\n"), "```"]
    else:
        lines.append("The run folder held no probe results when this was exported (`submit probe RUN` makes them).")
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "import timm",
        f"{import_line}model = timm.create_model(\"local-dir:{out_dir}\", pretrained=True).eval()",
        "transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))",
        "features = model(transform(image).unsqueeze(0))  # image: a PIL image",
        "```",
        "",
        f"`hf-hub:USER/REPO` in place of `local-dir:...` loads the folder once it is uploaded to the hub. "
        f"Pass `num_classes=N` to add a new, untrained classifier to fine-tune.",
        "",
    ]
    return "\n".join(lines)


def _inline_json(value: Any) -> str:
    return f" `{json.dumps(value, sort_keys=True)}`" if value else ""
