"""`key=value` overrides: parsing, and setting them into a composed config.

Every key must exist in the composed config (only `backbone.kwargs.*` is open), and a value must
have the type of the value it replaces; anything else is a one-line UserError naming the key and
the nearest valid one.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from selfsup.core.errors import UserError, closest

OPEN_SECTIONS = ("backbone.kwargs.",)  # free-form: passed through to a constructor
ALIASES = {
    "image_size": "data.image_size",
    "batch_size": "data.batch_size",
    "epochs": "trainer.max_epochs",
    "steps": "trainer.max_steps",
    "nodes": "cluster.nodes",
    "gpus_per_node": "cluster.gpus_per_node",
}


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        if "=" not in item or item.startswith("="):
            raise UserError(f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        pairs.append((ALIASES.get(key.strip(), key.strip()), value))
    return pairs


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_value(text: str) -> Any:
    """YAML scalars and lists, plus numbers such as 1e-3 that YAML 1.1 would leave as strings (in a
    list too: `[0.0,1e-3]`)."""
    import yaml

    value = _number(text)
    if value is not text:
        return value
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return [_number(v) if isinstance(v, str) else v for v in value] if isinstance(value, list) else value


def _flat_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, DictConfig):
            keys += _flat_keys(v, full + ".")
    return keys


def coerce_value(key: str, old: Any, new: Any) -> Any:
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
    OmegaConf.update(cfg, key, coerce_value(key, old, value), merge=False, force_add=True)


def uses_demo_data(pairs: list[tuple[str, str]]) -> bool:
    """No data given: the run is the demo on built-in data (a method's `demo:` settings apply)."""
    return not any(k in ("data", "data.name", "data.train") for k, _ in pairs)
