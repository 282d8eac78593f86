"""The image-classification target: a linear probe (weight decay, and the mini-batch solver's lr,
chosen on a validation split of train; selfsup.eval.solver) and weighted k-NN on features of
labelled image shards, top-1 / top-5 on the test split."""

from __future__ import annotations

from typing import Any

import torch

from selfsup.eval.targets import EvalTarget, ProbeResult, ResultTable, register_target

GROUP = "all"  # the classes are scored together: one group


class PixelFeatures(torch.nn.Module):
    """The raw-pixel baseline: the normalised image, flattened (one channel when all three are equal,
    as for grayscale data stored as RGB)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 3 and torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2]):
            x = x[:, :1]
        return x.flatten(1)


def evaluate(train_x, train_y, test_x, test_y, cfg) -> dict:
    from selfsup.eval.linear import knn_probe
    from selfsup.eval.solver import probe_linear

    p = cfg.probe
    if p.train_samples and p.train_samples < len(train_x):
        keep = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(p.seed))[: p.train_samples]
        train_x, train_y = train_x[keep], train_y[keep]
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    linear = probe_linear(train_x, train_y, test_x, test_y, num_classes, p)
    knn = knn_probe(train_x, train_y, test_x, test_y, num_classes, k=p.knn_k, temperature=p.knn_temperature)
    return {"linear": linear, "knn": knn, "train_samples": len(train_x), "test_samples": len(test_x),
            "feature_dim": int(train_x.shape[1])}


def layer_row(record: dict) -> dict:
    """One layer's row of the per-layer table: its scores as `evaluate` gave them."""
    lin, knn = record["linear"], record["knn"]
    return {"feature_dim": record["feature_dim"], "linear_top1": lin["top1"], "linear_top5": lin["top5"],
            "knn_top1": knn["top1"], "knn_top5": knn["top5"], "weight_decay": lin["chosen"]["weight_decay"]}


def chosen_pair(linear: dict) -> str:
    """The chosen penalty (and the mini-batch solver's learning rate), as the table prints it."""
    chosen = linear["chosen"]
    text = f"wd={chosen['weight_decay']:g}"
    if "lr" in chosen:
        text += f" lr={chosen['lr']:g}"
    return text + (f" ({linear['solver']})" if linear.get("solver", "lbfgs") != "lbfgs" else "")


def format_table(result, title: str) -> str:
    lin, knn = result["linear"], result["knn"]
    lines = [
        f"probe of {title}  ({result['train_samples']} train / {result['test_samples']} test, {result['feature_dim']}-d features)",
        f"  {'':<26}{'top-1':>8}{'top-5':>8}",
        f"  {'linear (chosen on val)':<26}{lin['top1']:>8.2f}{lin['top5']:>8.2f}   {chosen_pair(lin)}",
        f"  {'k-NN (k=%d, T=%g)' % (knn['k'], knn['temperature']):<26}{knn['top1']:>8.2f}{knn['top5']:>8.2f}",
    ]
    if result.get("layers"):
        random_init = random_init_layers(result)
        lines += ["  per layer (probe.layers; the rows above are the final pooled features)",
                  f"  {'layer':<10}{'module':<16}{'dim':>6}{'linear top-1':>14}{'top-5':>8}{'k-NN top-1':>12}"
                  + (f"{'random init linear top-1':>26}" if random_init else "")]
        lines += [f"  {r['layer']:<10}{r['module']:<16}{r['feature_dim']:>6}{r['linear_top1']:>14.2f}"
                  f"{r['linear_top5']:>8.2f}{r['knn_top1']:>12.2f}"
                  + (f"{random_init[r['layer']]['linear_top1']:>26.2f}" if r["layer"] in random_init else "")
                  for r in result["layers"]]
    return "\n".join(lines)


def random_init_layers(result) -> dict[str, dict]:
    """The per-layer rows of the random-init baseline (`probe.baselines=true`), by layer name."""
    baseline = (result.get("baselines") or {}).get("random_init") or {}
    return {row["layer"]: row for row in baseline.get("layers") or []}


def result_tables(result) -> list[ResultTable]:
    """The rows of `format_table` as tables: the final features' scores, then one row per layer."""
    lin, knn = result["linear"], result["knn"]
    tables = [ResultTable(
        f"{result['train_samples']} train / {result['test_samples']} test, {result['feature_dim']}-d features",
        ["probe", "top-1", "top-5", "setting"],
        [["linear (chosen on val)", f"{lin['top1']:.2f}", f"{lin['top5']:.2f}", f"wd={lin['chosen']['weight_decay']:g}"],
         ["k-NN", f"{knn['top1']:.2f}", f"{knn['top5']:.2f}", f"k={knn['k']}, T={knn['temperature']:g}"]])]
    if result.get("layers"):
        random_init = random_init_layers(result)
        extra = ["random init linear top-1", "random init k-NN top-1"] if random_init else []
        tables.append(ResultTable(
            "per layer (probe.layers)",
            ["layer", "module", "dim", "linear top-1", "linear top-5", "k-NN top-1", "k-NN top-5", "wd", *extra],
            [[r["layer"], r["module"], str(r["feature_dim"]), f"{r['linear_top1']:.2f}", f"{r['linear_top5']:.2f}",
              f"{r['knn_top1']:.2f}", f"{r['knn_top5']:.2f}", f"{r['weight_decay']:g}",
              *([f"{random_init[r['layer']]['linear_top1']:.2f}", f"{random_init[r['layer']]['knn_top1']:.2f}"]
                if extra and r["layer"] in random_init else ["-"] * len(extra))] for r in result["layers"]]))
    return tables


class ClassificationResult(ProbeResult):
    def table(self, title: str) -> str:
        return "\n".join([format_table(self, title), *self.baseline_lines()])

    def tables(self) -> list[ResultTable]:
        return result_tables(self) + [t for t in [self.baseline_table()] if t]

    def headline(self, record: dict[str, Any]) -> dict[str, float]:
        return {"linear top-1": record["linear"]["top1"], "k-NN top-1": record["knn"]["top1"]}

    def scalars(self) -> dict[str, float]:
        scalars = {"probe/linear_top1": self["linear"]["top1"], "probe/linear_top5": self["linear"]["top5"],
                   "probe/knn_top1": self["knn"]["top1"]}
        for row in self.get("layers") or []:
            for key in ("linear_top1", "linear_top5", "knn_top1"):
                scalars[f"probe/{row['layer']}/{key}"] = row[key]
        return scalars


@register_target
class ImageClassification(EvalTarget):
    name = "classification"
    summary = "top-1 / top-5 of a linear probe and k-NN on the classes of labelled images"
    result_type = ClassificationResult
    result_file = "probe.json"
    scores_layers = True
    splits_by_shard = True

    def labelled_batches(self, cfg, split: str, spec) -> dict:
        from selfsup.data.stream import eval_loader, expand_urls
        from selfsup.data.views import eval_view
        from selfsup.eval.decoded_splits import decoded_once, file_identity

        size, mean, std, batch_size = cfg.data.image_size, list(cfg.data.mean), list(cfg.data.std), cfg.probe.batch_size
        shards = file_identity(expand_urls(spec))
        key = ("classification", shards, size, tuple(mean), tuple(std), batch_size) if shards else None
        return {GROUP: decoded_once(key, lambda: eval_loader(spec, eval_view(size, mean, std), batch_size=batch_size,
                                                             num_workers=cfg.data.num_workers))}

    def pixels(self) -> torch.nn.Module:
        return PixelFeatures()

    def evaluate(self, features: dict, cfg) -> dict[str, Any]:
        return evaluate(*features["train"][GROUP], *features["test"][GROUP], cfg)

    def layer_row(self, record: dict[str, Any]) -> dict[str, Any]:
        return layer_row(record)
