"""`trainer.precision=auto` in a run's config: resolved (selfsup/core/precision.py) where the job
runs, said in one line, and undone on a saved config so that a resumed run resolves it again."""

from __future__ import annotations

from selfsup.core.precision import resolve_precision

# config.yaml holds the precision a run trains with (the value its checkpoints' config_hash
# describes); this key keeps that the user asked for `auto`, so that a resumed run resolves it again
REQUESTED_KEY = "precision_requested"


def apply_precision(cfg) -> bool:
    """Resolve `cfg.trainer.precision` in place; True when it was `auto` (the caller says what it became)."""
    resolved = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    changed = resolved != str(cfg.trainer.precision)
    if changed:
        cfg[REQUESTED_KEY] = str(cfg.trainer.precision)
    cfg.trainer.precision = resolved
    return changed


def resolve_run_precision(cfg) -> bool:
    """`apply_precision` where the run trains, said in one line; True when `auto` was resolved."""
    if not apply_precision(cfg):
        return False
    print(f"selfsup: trainer.precision=auto -> {cfg.trainer.precision} on this machine", flush=True)
    return True


def restore_requested_precision(cfg) -> None:
    """Undo `apply_precision` on a saved run config: back to what the user asked for."""
    requested = cfg.pop(REQUESTED_KEY, None)
    if requested is not None:
        cfg.trainer.precision = requested
