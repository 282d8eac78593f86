"""The linear probe at scale: every (L2 penalty, learning rate) pair of the sweep trained at once as
one batched linear layer, by mini-batch SGD with momentum and a cosine schedule over a fixed number
of epochs.

The P pairs' weights are one tensor [P, K, D], and a mini-batch goes through all of them in one
matrix product (`x @ W.view(P*K, D).T`): the features are read once per step for all pairs, and
the sweep costs one pass over the data per epoch instead of one per pair. Each pair minimises its
own mean cross-entropy plus 0.5 * penalty * |W|^2 (the penalty of the L-BFGS path, selfsup.eval.linear,
so `probe.weight_decays` mean the same on both). Pairs never mix: a pair that diverges leaves the
others as they would be alone.

Features stay where and as they are (float32, or bf16 / fp16 at scale): mini-batches are gathered
by index, moved to the device and standardised there with the train statistics; nothing copies the
whole matrix (on a GPU it is moved there once when it fits in half the free memory).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selfsup.eval.linear import LinearClassifier, split_train_val

# the best rates at 10 epochs were 0.1-1.0 on real 256-d and 512-d Fashion-MNIST features (10 classes)
# and 1.0 on synthetic 512-d features of 1000 classes: the grid brackets them
DEFAULT_LRS = (0.01, 0.1, 1.0)
STATS_CHUNK = 65536  # rows per pass of the feature statistics (bounds their memory)
SCORE_ELEMENTS = 1 << 25  # logits held at once while scoring: rows x pairs x classes


@dataclass(frozen=True)
class MinibatchSettings:
    epochs: int = 10
    batch_size: int = 4096
    lrs: tuple[float, ...] = DEFAULT_LRS
    momentum: float = 0.9
    autocast: torch.dtype | None = None  # the matrix products' dtype (bf16 where native), None: fp32
    device: str = "cpu"


def feature_stats(x: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (float32, [D]) of the rows `rows` of `x` (all rows: None),
    accumulated in float64 chunk by chunk, so a bf16 matrix is never copied whole to float32."""
    n = len(x) if rows is None else len(rows)
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for start in range(0, n, STATS_CHUNK):
        part = x[start:start + STATS_CHUNK] if rows is None else x[rows[start:start + STATS_CHUNK]]
        part = part.to("cpu", torch.float64)
        total += part.sum(0)
        squares += part.pow(2).sum(0)
    mean = total / n
    var = (squares - n * mean.pow(2)).clamp_min(0) / max(1, n - 1)  # unbiased, as torch.std
    return mean.float(), var.sqrt().float().clamp_min(1e-6)


def feature_source(x: torch.Tensor, device: str) -> torch.Tensor:
    """`x` on `device` when it fits in half the device's free memory (one copy for the whole fit),
    else `x` where it is (its mini-batches travel one by one)."""
    if torch.device(device).type != "cuda" or x.device.type == "cuda":
        return x
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return x.to(device) if x.numel() * x.element_size() < free // 2 else x


def _batch(source: torch.Tensor, idx: torch.Tensor, device: str, mean, std) -> torch.Tensor:
    xb = source[idx.to(source.device)].to(device, non_blocking=True)
    return (xb.float() - mean) / std


def train_pairs(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decays, lrs, settings: MinibatchSettings,
                *, rows: torch.Tensor | None = None, seed: int = 0, source: torch.Tensor | None = None,
                max_steps: int | None = None, stats: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[list[LinearClassifier], list[bool]]:
    """One classifier per (weight_decays[i], lrs[i]) pair, trained together on the rows `rows` of
    `x` (all: None), and whether each stayed finite. The order of the mini-batches depends on `seed`
    alone, so a pair trained in a sweep and alone sees the same batches. `max_steps` ends the fit
    early (the schedule keeps its length): benchmarks time a few steps of a long fit. `stats`: the
rows' (mean, std), when known."""
    device = settings.device
    rows = torch.arange(len(x)) if rows is None else rows
    source = x if source is None else source
    mean, std = (t.to(device) for t in (stats or feature_stats(x, rows)))
    pairs = len(weight_decays)
    dim = x.shape[1]
    weight = torch.zeros(pairs, num_classes, dim, device=device, requires_grad=True)
    bias = torch.zeros(pairs, num_classes, device=device, requires_grad=True)
    decay = torch.tensor(weight_decays, dtype=torch.float32, device=device)
    lr = torch.tensor(lrs, dtype=torch.float32, device=device)
    # each pair's learning rate scales its own loss and the optimizer runs at lr 1: momentum SGD is
    # linear in the gradient, so that is SGD at the pair's rate, with one optimizer for all pairs
    optimizer = torch.optim.SGD([weight, bias], lr=1.0, momentum=settings.momentum)
    steps = settings.epochs * math.ceil(len(rows) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    order = torch.Generator().manual_seed(seed)
    y_rows = y[rows].to(device)
    device_type = torch.device(device).type
    batches = (batch for _ in range(settings.epochs)
               for batch in torch.randperm(len(rows), generator=order).split(settings.batch_size))
    for batch in itertools.islice(batches, max_steps):
        xb = _batch(source, rows[batch], device, mean, std)
        yb = y_rows[batch.to(device)]
        with torch.autocast(device_type, dtype=settings.autocast, enabled=settings.autocast is not None):
            logits = (xb @ weight.flatten(0, 1).T).view(len(xb), pairs, num_classes)
        logits = logits.float() + bias
        # each pair's cross-entropy, in float32: [B * P, K] rows against the labels repeated per pair
        # (the 2-d form over [B, K, P] is several times slower on a CPU)
        ce = F.cross_entropy(logits.flatten(0, 1), yb.repeat_interleave(pairs), reduction="none").view(-1, pairs).mean(0)
        loss = (lr * (ce + 0.5 * decay * weight.pow(2).sum((1, 2)))).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    weight, bias = weight.detach(), bias.detach()
    finite = (weight.isfinite().all(2).all(1) & bias.isfinite().all(1)).tolist()
    mean, std = mean.cpu(), std.cpu()
    return [LinearClassifier(weight[p].cpu(), bias[p].cpu(), mean, std) for p in range(pairs)], finite


def batched_topk(classifiers: list[LinearClassifier], x: torch.Tensor, y: torch.Tensor, device: str,
                 rows: torch.Tensor | None = None, ks: tuple[int, ...] = (1,)) -> torch.Tensor:
    """Top-k accuracy (%) [P, len(ks)] of every classifier on the rows `rows` of `x`, chunk by chunk
    on `device`: only a chunk's logits are ever held (a validation split of ImageNet's size would
    be 7.7 GB of logits for 15 pairs). All classifiers share one standardisation."""
    first = classifiers[0]
    weight = torch.stack([c.weight for c in classifiers]).to(device)
    bias = torch.stack([c.bias for c in classifiers]).to(device)
    mean, std = first.mean.to(device), first.std.to(device)
    rows = torch.arange(len(x)) if rows is None else rows
    pairs, classes = weight.shape[:2]
    chunk = max(1, SCORE_ELEMENTS // (pairs * classes))
    top = min(max(ks), classes)
    correct = torch.zeros(pairs, len(ks), dtype=torch.long)
    for idx in rows.split(chunk):
        xb = _batch(x, idx, device, mean, std)
        ranked = (torch.einsum("nd,pkd->pnk", xb, weight) + bias[:, None]).topk(top, dim=2).indices
        hits = ranked == y[idx].to(device)[None, :, None]  # [P, n, top]
        correct += torch.stack([hits[:, :, :k].any(2).sum(1) for k in ks], 1).cpu()
    return correct.double() * 100 / len(rows)


@dataclass(frozen=True)
class MinibatchResult:
    classifier: LinearClassifier
    chosen: dict
    sweep: list[dict]


def select_and_fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, weight_decays, settings: MinibatchSettings,
                   val_fraction: float = 0.1, seed: int = 0) -> MinibatchResult:
    """Every (penalty, lr) pair trained at once on train less a validation split carved from it,
    the pair with the best validation top-1 chosen (ties: the earlier pair), then trained alone on
    the whole train split."""
    grid = [(wd, lr) for wd in weight_decays for lr in settings.lrs]
    fit_idx, val_idx = split_train_val(len(x), val_fraction, seed)
    source = feature_source(x, settings.device)
    classifiers, finite = train_pairs(x, y, num_classes, [wd for wd, _ in grid], [lr for _, lr in grid], settings,
                                      rows=fit_idx, seed=seed, source=source)
    val_top1 = batched_topk(classifiers, source, y, settings.device, val_idx)[:, 0].tolist()
    sweep = []
    for (wd, lr), ok, top1 in zip(grid, finite, val_top1, strict=True):
        top1 = top1 if ok else 0.0
        sweep.append({"weight_decay": wd, "lr": lr, "val_top1": top1, **({} if ok else {"diverged": True})})
    best = max(sweep, key=lambda r: r["val_top1"])
    chosen = {"weight_decay": best["weight_decay"], "lr": best["lr"]}
    (classifier,), _ = train_pairs(x, y, num_classes, [chosen["weight_decay"]], [chosen["lr"]], settings,
                                   seed=seed, source=source)
    return MinibatchResult(classifier, chosen, sweep)


def minibatch_probe(train_x, train_y, test_x, test_y, num_classes: int, *, settings: MinibatchSettings,
                    weight_decays, val_fraction: float = 0.1, seed: int = 0) -> dict:
    """The pair chosen on validation, retrained on the whole train split, scored on test once."""
    fit = select_and_fit(train_x, train_y, num_classes, weight_decays=weight_decays, settings=settings,
                         val_fraction=val_fraction, seed=seed)
    top1, top5 = batched_topk([fit.classifier], test_x, test_y, settings.device, ks=(1, 5))[0].tolist()
    return {"top1": top1, "top5": top5, "chosen": fit.chosen, "sweep": fit.sweep}
