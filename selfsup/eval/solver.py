"""Which solver fits the linear probe (`probe.solver`): full-batch L-BFGS (selfsup.eval.linear) for
data of ordinary size, where it is deterministic, converges and is fast, or the batched mini-batch
sweep (selfsup.eval.minibatch) for data whose full-batch fit would take hours (ImageNet's 1.28M
2048-d features of 1000 classes: BENCHMARKS.md). `auto` decides by the size of the train split,
samples x feature dim x classes, against `probe.minibatch.auto_above`: the same config picks the
same solver on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfsup.core.errors import UserError
from selfsup.core.precision import resolve_precision
from selfsup.eval.linear import LinearClassifier, linear_probe, select_hyperparameters, train_linear
from selfsup.eval.minibatch import MinibatchSettings, minibatch_probe, select_and_fit

SOLVERS = ("auto", "lbfgs", "minibatch")


def check_solver(probe_cfg) -> None:
    solver = str(probe_cfg.solver)
    if solver not in SOLVERS:
        raise UserError(f"probe.solver={probe_cfg.solver!r}: use auto (L-BFGS up to probe.minibatch.auto_above = "
                        "samples x dims x classes, mini-batch above), lbfgs or minibatch")


def resolve_solver(probe_cfg, samples: int, dim: int, classes: int) -> str:
    solver = str(probe_cfg.solver)
    if solver != "auto":
        return solver
    return "minibatch" if samples * dim * classes > float(probe_cfg.minibatch.auto_above) else "lbfgs"


def fit_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def minibatch_settings(probe_cfg, device: str | None = None) -> MinibatchSettings:
    """The mini-batch settings of `probe.minibatch`; its matrix products run in bf16 where
    `probe.precision` resolves to bf16 on the fitting device (fp16 would need loss scaling: fp32 there)."""
    device = device or fit_device()
    m = probe_cfg.minibatch
    bf16 = resolve_precision(probe_cfg.precision, device) == "bf16-mixed"
    return MinibatchSettings(epochs=int(m.epochs), batch_size=int(m.batch_size), lrs=tuple(float(v) for v in m.lrs),
                             momentum=float(m.momentum), autocast=torch.bfloat16 if bf16 else None, device=device)


def probe_linear(train_x, train_y, test_x, test_y, num_classes: int, probe_cfg) -> dict:
    """The linear probe's record: top-1 / top-5 on test of the classifier chosen on validation,
    `chosen`, `sweep`, and `solver` (which one ran)."""
    p = probe_cfg
    solver = resolve_solver(p, len(train_x), int(train_x.shape[1]), num_classes)
    if solver == "lbfgs":
        record = linear_probe(train_x, train_y, test_x, test_y, num_classes, max_iter=p.max_iter,
                              val_fraction=p.val_fraction, select_samples=p.select_samples, seed=p.seed,
                              weight_decays=tuple(p.weight_decays))
    else:
        settings = minibatch_settings(p)
        record = minibatch_probe(train_x, train_y, test_x, test_y, num_classes, settings=settings,
                                 weight_decays=tuple(p.weight_decays), val_fraction=p.val_fraction, seed=p.seed)
        record["device"] = settings.device
    return {**record, "solver": solver}


@dataclass(frozen=True)
class FittedLinear:
    classifier: LinearClassifier
    chosen: dict
    solver: str


def fit_linear(x, y, num_classes: int, probe_cfg) -> FittedLinear:
    """A classifier of `x`, its penalty (and, mini-batch, its learning rate) chosen on a validation
    split of `x`, retrained on all of `x`: for targets that score the classifier their own way."""
    p = probe_cfg
    solver = resolve_solver(p, len(x), int(x.shape[1]), num_classes)
    if solver == "lbfgs":
        chosen, _ = select_hyperparameters(x, y, num_classes, weight_decays=tuple(p.weight_decays),
                                           val_fraction=p.val_fraction, max_iter=p.max_iter,
                                           select_samples=p.select_samples, seed=p.seed)
        return FittedLinear(train_linear(x, y, num_classes, max_iter=p.max_iter, **chosen), chosen, solver)
    fit = select_and_fit(x, y, num_classes, weight_decays=tuple(p.weight_decays), settings=minibatch_settings(p),
                         val_fraction=p.val_fraction, seed=p.seed)
    return FittedLinear(fit.classifier, fit.chosen, solver)
