"""Config composition: defaults -> method -> backbone -> data -> cluster -> strategy -> key=value.

Every key must exist in the composed config (only `backbone.kwargs.*` is open), and a value must
have the type of the value it replaces; anything else is a one-line UserError naming the key and
the nearest valid one. No torch here: this runs at CLI start-up.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from selfsup.core.errors import UserError, closest, unknown_choice

GROUPS = ("data", "cluster", "strategy")  # `group=name` selects configs/<group>/<name>.yaml
OPEN_SECTIONS = ("backbone.kwargs.",)  # free-form: passed through to a constructor
ALIASES = {
    "image_size": "data.image_size",
    "batch_size": "data.batch_size",
    "epochs": "trainer.max_epochs",
    "steps": "trainer.max_steps",
    "nodes": "cluster.nodes",
    "gpus_per_node": "cluster.gpus_per_node",
}


def config_root() -> Path:
    env = os.environ.get("SELFSUP_CONFIGS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "configs"


def available(group: str) -> list[str]:
    return sorted(p.stem for p in (config_root() / group).glob("*.yaml"))


def _load(path: Path) -> DictConfig:
    return OmegaConf.load(path)  # type: ignore[return-value]


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        if "=" not in item or item.startswith("="):
            raise UserError(f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        pairs.append((ALIASES.get(key.strip(), key.strip()), value))
    return pairs


def parse_value(text: str) -> Any:
    """YAML scalars and lists, plus numbers such as 1e-3 that YAML 1.1 would leave as strings."""
    import yaml

    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _flat_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, DictConfig):
            keys += _flat_keys(v, full + ".")
    return keys


def _coerce(key: str, old: Any, new: Any) -> Any:
    """`new` in the type of `old` (the default), or a UserError."""
    if old is None or new is None:
        return new
    kind = type(old)
    if kind is bool:
        if isinstance(new, bool):
            return new
    elif kind is int:
        if isinstance(new, int) and not isinstance(new, bool):
            return new
    elif kind is float:
        if isinstance(new, (int, float)) and not isinstance(new, bool):
            return float(new)
    elif kind is str:
        if not isinstance(new, (list, dict)):
            return str(new)
    elif OmegaConf.is_list(old) or isinstance(old, list):
        if isinstance(new, list):
            return new
    elif OmegaConf.is_dict(old) or isinstance(old, dict):
        if isinstance(new, dict):
            return new
    names = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}
    want = names.get(kind, "a list" if OmegaConf.is_list(old) else "a mapping")
    raise UserError(f"config key {key!r} expects {want}, got {new!r}")


def set_key(cfg: DictConfig, key: str, raw: str) -> None:
    value = parse_value(raw)
    exists = OmegaConf.select(cfg, key, default="__missing__") != "__missing__"
    if not exists and not key.startswith(OPEN_SECTIONS):
        leaves = [k for k in _flat_keys(cfg) if not OmegaConf.is_config(OmegaConf.select(cfg, k))]
        near = closest(key, leaves, n=2)
        hint = f": did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
        raise UserError(f"unknown config key {key!r}{hint}")
    old = OmegaConf.select(cfg, key) if exists else None
    OmegaConf.update(cfg, key, _coerce(key, old, value), merge=False, force_add=True)


def select_data(cfg: DictConfig, value: str) -> DictConfig:
    """`data=NAME` picks configs/data/NAME.yaml; `data=<path or pattern>` streams those shards."""
    names = available("data")
    if value in names:
        return OmegaConf.merge(cfg, _load(config_root() / "data" / f"{value}.yaml"))
    if any(c in value for c in "/{*.:") or Path(value).exists():
        return OmegaConf.merge(cfg, {"data": {"name": "shards", "train": value}})
    raise unknown_choice("data (a built-in dataset, or a shard path/pattern)", value, names)


def uses_demo_data(pairs: list[tuple[str, str]]) -> bool:
    """No data given: the run is the demo on built-in data (a method's `demo:` settings apply)."""
    return not any(k in ("data", "data.name", "data.train") for k, _ in pairs)


def compose(method: str, backbone: str, overrides: list[str], base: DictConfig | None = None) -> DictConfig:
    """The resolved run config. `base` (a saved run config, for resume) replaces the file layers."""
    from selfsup.backbones import backbone_names, get_spec
    from selfsup.ssl import check_pair, method_entry

    pairs = parse_overrides(overrides)
    if base is None:
        method_entry(method)
        get_spec(backbone)
        check_pair(method, backbone)
        root = config_root()
        cfg = _load(root / "defaults.yaml")
        method_cfg = _load(root / "method" / f"{method}.yaml")
        per_backbone = method_cfg.pop("backbones", None) or {}
        demo = method_cfg.pop("demo", None) or {}
        recipe = per_backbone.get(backbone) or OmegaConf.create({})
        # a backbone's recipe may carry its own `demo:`, applied after the method's (e.g. SiT: the
        # official ViT-B recipe keeps 224 px on the demo data, the CPU vit_t recipe its 32 px)
        backbone_demo = recipe.pop("demo", None) or {}
        cfg = OmegaConf.merge(cfg, method_cfg, {"backbone": {"name": backbone}})
        if (root / "backbone" / f"{backbone}.yaml").exists():
            cfg = OmegaConf.merge(cfg, _load(root / "backbone" / f"{backbone}.yaml"))
        cfg = OmegaConf.merge(cfg, recipe)
        selected = {k: v for k, v in pairs if k in GROUPS}
        if "data" in selected:
            cfg = select_data(cfg, selected["data"])
        elif (root / "data" / f"{cfg.data.name}.yaml").exists():
            cfg = OmegaConf.merge(cfg, _load(root / "data" / f"{cfg.data.name}.yaml"))
        if uses_demo_data(pairs):
            cfg = OmegaConf.merge(cfg, demo, backbone_demo)
        for group in ("cluster", "strategy"):
            name = selected.get(group, cfg[group].name)
            if name not in available(group):
                raise unknown_choice(group, name, available(group))
            cfg = OmegaConf.merge(cfg, _load(root / group / f"{name}.yaml"))
    else:
        cfg = base.copy()
        if "data" in dict(pairs):
            cfg = select_data(cfg, dict(pairs)["data"])
    for key, raw in pairs:
        if key not in GROUPS:
            set_key(cfg, key, raw)
    assert backbone in backbone_names()
    return cfg


def config_hash(cfg: DictConfig) -> str:
    return hashlib.sha1(OmegaConf.to_yaml(cfg, sort_keys=True).encode()).hexdigest()[:12]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)
