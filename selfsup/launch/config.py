"""Config composition: defaults -> method (and its per-backbone recipe) -> data -> cluster -> strategy
-> key=value.

Every key must exist in the composed config (only `backbone.kwargs.*` is open), and a value must
have the type of the value it replaces; anything else is a one-line UserError naming the key and
the nearest valid one (selfsup/core/overrides.py). No torch here: this runs at CLI start-up.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from selfsup.core.config_files import available, config_root, load_config, select_data
from selfsup.core.errors import unknown_choice
from selfsup.core.overrides import parse_overrides, set_key, uses_demo_data

GROUPS = ("data", "cluster", "strategy")  # `group=name` selects configs/<group>/<name>.yaml


def compose(method: str, backbone: str, overrides: list[str], base: DictConfig | None = None) -> DictConfig:
    """The resolved run config. `base` (a saved run config, for resume) replaces the file layers."""
    from selfsup.backbones import get_spec
    from selfsup.ssl import check_pair, method_entry

    pairs = parse_overrides(overrides)
    if base is None:
        method_entry(method)
        get_spec(backbone)
        check_pair(method, backbone)
        root = config_root()
        cfg = load_config(root / "defaults.yaml")
        method_cfg = load_config(root / "method" / f"{method}.yaml")
        per_backbone = method_cfg.pop("backbones", None) or {}
        demo = method_cfg.pop("demo", None) or {}
        recipe = per_backbone.get(backbone) or OmegaConf.create({})
        # a backbone's recipe may carry its own `demo:`, applied after the method's (e.g. SiT: the
        # official ViT-B recipe keeps 224 px on the demo data, the CPU vit_t recipe its 32 px)
        backbone_demo = recipe.pop("demo", None) or {}
        cfg = OmegaConf.merge(cfg, method_cfg, {"backbone": {"name": backbone}})
        cfg = OmegaConf.merge(cfg, recipe)
        selected = {k: v for k, v in pairs if k in GROUPS}
        if "data" in selected:
            cfg = select_data(cfg, selected["data"])
        elif (root / "data" / f"{cfg.data.name}.yaml").exists():
            cfg = OmegaConf.merge(cfg, load_config(root / "data" / f"{cfg.data.name}.yaml"))
        if uses_demo_data(pairs):
            cfg = OmegaConf.merge(cfg, demo, backbone_demo)
        for group in ("cluster", "strategy"):
            name = selected.get(group, cfg[group].name)
            if name not in available(group):
                raise unknown_choice(group, name, available(group))
            cfg = OmegaConf.merge(cfg, load_config(root / group / f"{name}.yaml"))
    else:
        get_spec(backbone)  # a resumed run's backbone must still be registered
        cfg = base.copy()
        if "data" in dict(pairs):
            cfg = select_data(cfg, dict(pairs)["data"])
    for key, raw in pairs:
        if key not in GROUPS:
            set_key(cfg, key, raw)
    return cfg

