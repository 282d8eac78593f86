"""Config of `submit continual`: configs/continual/<method>.yaml -> data -> per-backbone -> key=value.
A new or resumed run's config and folder come from selfsup/launch/run_config.py, as for pretraining.
No torch here (CLI start-up)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from selfsup.core.config_files import config_root, load_config, select_data
from selfsup.core.errors import UserError, unknown_choice
from selfsup.core.overrides import parse_overrides, set_key

METHODS = {"contracon": "exemplar-free continual transformer: per-head convolutional re-weighting of Q/K/V per task"}
ALIASES = {
    "tasks": "continual.tasks",
    "epochs": "continual.epochs",
    "init": "continual.init",
    "kernel_size": "continual.kernel_size",
    "batch_size": "data.batch_size",
    "image_size": "data.image_size",
}


# how `submit continual` tells which task a test image belongs to (class-incremental evaluation)
TASK_ID_RULES = ("entropy", "mahalanobis")


def task_id_rules(cfg: DictConfig) -> list[str]:
    if not cfg.eval.cil:
        return []
    rules = list(cfg.eval.task_id)
    for rule in rules:
        if rule not in TASK_ID_RULES:
            raise unknown_choice("eval.task_id rule", rule, TASK_ID_RULES)
    return rules


def check_settings(cfg: DictConfig) -> None:
    """The checks that read the config alone (numbers, the task-identification rules): the CLI makes
    them before it imports torch, so such a config is refused in a fraction of a second."""
    from selfsup.core.config_checks import check_numbers

    check_numbers(cfg)
    task_id_rules(cfg)


def continual_data_names() -> list[str]:
    return sorted(p.stem for p in (config_root() / "continual" / "data").glob("*.yaml"))


def _pairs(overrides: list[str]) -> list[tuple[str, str]]:
    mapped = []
    for item in overrides:
        key, sep, value = item.partition("=")
        mapped.append(f"{ALIASES.get(key.strip(), key.strip())}{sep}{value}")
    return parse_overrides(mapped)


def _select_data(cfg: DictConfig, value: str) -> DictConfig:
    if value in continual_data_names():
        return OmegaConf.merge(cfg, load_config(config_root() / "continual" / "data" / f"{value}.yaml"))
    try:
        return select_data(cfg, value)
    except UserError:
        raise unknown_choice("data (a split dataset, a built-in dataset or a shard path/pattern)", value,
                             continual_data_names() + ["fashion_mnist", "digits"]) from None


def compose(method: str, backbone: str, overrides: list[str], base: DictConfig | None = None) -> DictConfig:
    from selfsup.backbones import get_spec

    if method not in METHODS:
        raise unknown_choice("continual method", method, METHODS)
    spec = get_spec(backbone)
    if spec.family != "vit":
        raise UserError(f"{method} re-weights attention weights: it needs a transformer backbone (cct_*, vit_*), "
                        f"not {backbone} (a {spec.family})")
    pairs = _pairs(overrides)
    if base is None:
        cfg = load_config(config_root() / "continual" / f"{method}.yaml")
        per_backbone = cfg.pop("backbones", None) or {}
        cfg.backbone.name = backbone
        data = dict(pairs).get("data", "split_fashion_mnist")
        cfg = _select_data(cfg, data)
        if backbone in per_backbone:
            cfg = OmegaConf.merge(cfg, per_backbone[backbone])
    else:
        cfg = base.copy()
        if "data" in dict(pairs):
            cfg = _select_data(cfg, dict(pairs)["data"])
    for key, raw in pairs:
        if key != "data":
            set_key(cfg, key, raw)
    if cfg.continual.tasks < 1:
        raise UserError(f"tasks={cfg.continual.tasks}: need at least one task")
    return cfg

