"""Checks that a pretraining config can run, made before its run folder exists.

Each check raises one UserError that names the bad value and what would work. The generic checks
(numbers, the run's length, the split of data across ranks) read the config alone; the model check
builds the backbone on the meta device (shapes, no memory, no weights) and asks the backbone and then
the method whether they can take the configured images. No torch at import: the CLI imports this
module inside its commands.
"""

from __future__ import annotations

from omegaconf import DictConfig

from selfsup.core.config_checks import check_choices, check_devices, check_numbers, check_run_length, configured_ranks
from selfsup.core.errors import UserError, closest


def check_pretrain(cfg: DictConfig, *, data_is_here: bool = True) -> None:
    """Every check of a `submit pretrain` config, cheapest first. `data_is_here`: the shards are
    readable from this machine (false for a Slurm submission, whose nodes may see other paths)."""
    check_numbers(cfg)
    check_choices(cfg)
    check_run_length(cfg.trainer)
    check_devices(cfg.trainer)
    if data_is_here:
        check_train_data(cfg)
    check_model(cfg)


def check_optimizer_name(name: str) -> None:
    """timm's optimizer registry (imports timm), plus `sgd` (ssl/base.py: Nesterov or heavy-ball SGD)."""
    from timm.optim import list_optimizers

    names = set(list_optimizers()) | {"sgd"}
    if name not in names:
        near = " or ".join(repr(n) for n in closest(name, sorted(names)))
        raise UserError(f"unknown optim.name {name!r}: did you mean {near}? "
                        f"(any of timm's {len(names)} optimizers, e.g. adamw, adam, sgd, lamb, lars)")


def check_global_batch_fits_epoch(cfg: DictConfig, samples: int | None) -> None:
    """Every rank takes whole batches of data.batch_size (a per-device batch) from each epoch: an epoch
    smaller than one batch per rank cannot be split across the ranks."""
    ranks = configured_ranks(cfg.trainer)
    if samples is None or ranks is None:
        return
    batch = int(cfg.data.batch_size)
    if samples < batch * ranks:
        per_rank = f"{batch} images x {ranks} ranks = {batch * ranks}" if ranks > 1 else f"{batch} images"
        fits = max(1, samples // ranks)
        raise UserError(f"an epoch of {samples} samples is smaller than one global batch ({per_rank}): "
                        f"set data.batch_size={fits} or less, or more data (data.epoch_samples)")


def check_train_data(cfg: DictConfig) -> None:
    """The training shards exist and their size is known (a missing path fails here, not after the
    run folder is made), and an epoch holds a batch for every rank. Built-in datasets are not
    written here to count them. Remote shards (http(s)://, pipe:) are not looked for one by one: an
    http(s) dataset's index.json is read from the shards' folder URL (an unreachable server fails
    here), and without one (or for pipe:) data.epoch_samples must say the epoch's size."""
    samples = cfg.data.get("epoch_samples")
    if cfg.data.get("train"):
        from selfsup.data.stream import count_samples, unknown_size

        counted = count_samples(cfg.data.train)
        if counted is None and not samples:
            raise unknown_size(cfg.data.train)
        samples = samples or counted
    check_global_batch_fits_epoch(cfg, samples)


def check_model(cfg: DictConfig) -> None:
    """The backbone can take data.image_size images, then the method's own rules (ssl/base.py,
    SSLMethod.check_config)."""
    from selfsup.backbones.meta import meta_backbone
    from selfsup.ssl import method_class

    check_optimizer_name(str(cfg.optim.name))
    backbone = meta_backbone(cfg)
    backbone.check_image_size(int(cfg.data.image_size))
    method_class(cfg.method.name).check_config(cfg, backbone)
