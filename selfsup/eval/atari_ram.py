"""`submit probe RUN data=atari_ram`: the AtariARI-style probe (Anand et al. 2019) of a frozen encoder,
registered as the eval target `atari_ram` (selfsup.eval.targets).

For every game and every annotated RAM variable (selfsup.data.atari.RAM_VARIABLES) a linear
classifier predicts the variable's byte value (up to 256 classes) from the encoder's pooled
representation of a 3-frame stack; the label is the RAM after the stack's last frame. Train on
stacks of the train split, score on the test split (held-out episodes, played with another seed):
weighted F1 per variable (as AtariARI), and the mean over variables. A variable that is constant in
the probe's train split is reported but left out of the mean (any probe gets it right).

The classifier is the logistic regression of selfsup.eval.solver (`probe.solver`: L-BFGS at the
size of these probes), its L2 penalty chosen on a validation split carved from the train stacks.
Baselines: `random:<backbone>` (the same encoder at its random init) and `pixels` (the stack's last
frame, 84x84 = 7056 values, standardised). The probe reads the final pooled features only:
`probe.layers` is refused (EvalTarget.scores_layers).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from selfsup.core.errors import UserError
from selfsup.eval.targets import EvalTarget, ProbeResult, ResultTable, register_target


class LastFramePixels(torch.nn.Module):
    """The raw-pixel baseline of the RAM probe: the stack's last frame, flattened."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1].flatten(1)


def load_split(spec) -> list:
    """Every chunk of an Atari split, decoded, in stored order."""
    from selfsup.data.atari import decode_chunk
    from selfsup.data.stream import expand_urls

    import webdataset as wds

    dataset = wds.WebDataset(expand_urls(spec), shardshuffle=False, empty_check=False)
    chunks = [decode_chunk(s) for s in dataset]
    if not chunks:
        raise UserError(f"no Atari episode chunks in {spec!r} (write them with `submit shards atari OUT`)")
    return chunks


def select_refs(chunks: list, per_game: int | None, seed: int) -> dict[str, list[tuple]]:
    """(chunk, t) references per game: every stack start, or a seeded subset of `per_game` of them."""
    refs: dict[str, list[tuple]] = {}
    for chunk in chunks:
        refs.setdefault(chunk.game, []).extend((chunk, t) for t in chunk.starts())
    if per_game:
        rng = np.random.default_rng(seed)
        for game, items in refs.items():
            if len(items) > per_game:
                keep = np.sort(rng.choice(len(items), per_game, replace=False))
                refs[game] = [items[i] for i in keep]
    return refs


class StackBatches:
    """Batches of the stacks o_t (`image`: resized and normalised as the backbone was trained) and
    the RAM after each stack (`label`: uint8 [B, 128])."""

    def __init__(self, refs: list[tuple], cfg: DictConfig):
        self.refs = refs
        self.batch_size = int(cfg.probe.batch_size)
        self.size = int(cfg.data.image_size)
        self.mean = torch.tensor(list(cfg.data.mean)).view(1, 3, 1, 1)
        self.std = torch.tensor(list(cfg.data.std)).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return math.ceil(len(self.refs) / self.batch_size)

    def __iter__(self):
        import torch.nn.functional as F

        for i in range(0, len(self.refs), self.batch_size):
            part = self.refs[i : i + self.batch_size]
            x = torch.from_numpy(np.stack([c.stack(t) for c, t in part])).float().div_(255)
            if x.shape[-1] != self.size:
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
            yield {"image": (x - self.mean) / self.std, "label": torch.from_numpy(np.stack([c.ram_at(t) for c, t in part]))}


def _to_cache(features: dict) -> dict:
    """{game: [train_x, train_ram, test_x, test_ram]}, every one a tensor."""
    return {g: [torch.as_tensor(part) for part in parts] for g, parts in features.items()}


def _from_cache(stored: dict) -> dict:
    """The inverse of `_to_cache`: features as float tensors, the RAM as uint8 arrays."""
    return {g: (train_x, train_ram.numpy(), test_x, test_ram.numpy()) for g, (train_x, train_ram, test_x, test_ram) in stored.items()}


def probe_variable(train_x, train_y: np.ndarray, test_x, test_y: np.ndarray, cfg: DictConfig) -> dict:
    """One variable: logistic regression over the byte values seen in train; weighted F1 on test."""
    from sklearn.metrics import f1_score

    from selfsup.eval.solver import fit_linear

    classes = np.unique(train_y)
    result = {"train_values": int(len(classes)), "test_values": int(len(np.unique(test_y)))}
    if len(classes) < 2:
        pred = np.full_like(test_y, classes[0])
        return {**result, "f1": float(f1_score(test_y, pred, average="weighted", zero_division=0)), "constant": True}
    lookup = {int(v): i for i, v in enumerate(classes)}
    ytr = torch.tensor([lookup[int(v)] for v in train_y])
    fit = fit_linear(train_x, ytr, len(classes), cfg.probe)
    pred = classes[fit.classifier.logits(test_x).argmax(1).numpy()]
    return {**result, "f1": float(f1_score(test_y, pred, average="weighted", zero_division=0)),
            "accuracy": float((pred == test_y).mean()), "weight_decay": fit.chosen["weight_decay"],
            **({"lr": fit.chosen["lr"]} if "lr" in fit.chosen else {}), "solver": fit.solver, "constant": False}


def evaluate_ram(features: dict, cfg: DictConfig) -> dict:
    from selfsup.data.atari import RAM_VARIABLES

    rows = []
    for game, (train_x, train_ram, test_x, test_ram) in features.items():
        for name, pos in RAM_VARIABLES.get(game, {}).items():
            r = probe_variable(train_x, train_ram[:, pos], test_x, test_ram[:, pos], cfg)
            rows.append({"game": game, "variable": name, "ram": pos, **r})
    counted = [r["f1"] for r in rows if not r["constant"]]
    if not rows:
        raise UserError(f"no annotated RAM variables for the games {sorted(features)}")
    return {
        "variables": rows,
        "mean_f1": float(np.mean(counted)) if counted else float("nan"),
        "per_game_mean_f1": {g: float(np.mean([r["f1"] for r in rows if r["game"] == g and not r["constant"]] or [np.nan]))
                             for g in features},
        "train_samples": {g: int(len(f[0])) for g, f in features.items()},
        "test_samples": {g: int(len(f[2])) for g, f in features.items()},
        "feature_dim": int(next(iter(features.values()))[0].shape[1]),
    }


def format_ram_table(result: dict, title: str) -> str:
    lines = [f"RAM probe of {title}  (train/test stacks per game: "
             + ", ".join(f"{g} {result['train_samples'][g]}/{result['test_samples'][g]}" for g in result["train_samples"])
             + f"; {result['feature_dim']}-d features; test = held-out episodes)",
             f"  {'game':<10}{'variable':<18}{'RAM':>5}{'values':>8}{'F1':>8}"]
    for r in result["variables"]:
        note = "  (constant in train: not in the mean)" if r["constant"] else ""
        lines.append(f"  {r['game']:<10}{r['variable']:<18}{r['ram']:>5}{r['train_values']:>8}{r['f1']:>8.3f}{note}")
    for g, v in result["per_game_mean_f1"].items():
        lines.append(f"  {g:<10}{'mean':<18}{'':>13}{v:>8.3f}")
    lines.append(f"  {'all':<10}{'mean F1':<18}{'':>13}{result['mean_f1']:>8.3f}")
    return "\n".join(lines)


def ram_tables(result: dict) -> list[ResultTable]:
    """The rows of `format_ram_table` as tables: one row per variable, then the means."""
    samples = ", ".join(f"{g} {result['train_samples'][g]}/{result['test_samples'][g]}" for g in result["train_samples"])
    variables = ResultTable(
        f"weighted F1 per RAM variable (train/test stacks: {samples}; {result['feature_dim']}-d features)",
        ["game", "variable", "RAM", "values", "F1", "note"],
        [[r["game"], r["variable"], str(r["ram"]), str(r["train_values"]), f"{r['f1']:.3f}",
          "constant in train: not in the mean" if r["constant"] else ""] for r in result["variables"]])
    means = ResultTable("mean F1", ["game", "F1"],
                        [[g, f"{v:.3f}"] for g, v in result["per_game_mean_f1"].items()]
                        + [["all", f"{result['mean_f1']:.3f}"]])
    return [variables, means]


class RamProbeResult(ProbeResult):
    score_format = "{:.3f}"

    def table(self, title: str) -> str:
        return "\n".join([format_ram_table(self, title), *self.baseline_lines()])

    def tables(self) -> list[ResultTable]:
        return ram_tables(self) + [t for t in [self.baseline_table()] if t]

    def headline(self, record: dict[str, Any]) -> dict[str, float]:
        return {"mean F1": record["mean_f1"]}

    def scalars(self) -> dict[str, float]:
        return {"probe/ram_f1_mean": self["mean_f1"],
                **{f"probe_ram/{r['game']}_{r['variable']}": r["f1"] for r in self["variables"]}}


@register_target
class AtariRam(EvalTarget):
    name = "atari_ram"
    summary = "weighted F1 of a linear probe per annotated Atari RAM variable, on held-out episodes"
    result_type = RamProbeResult
    result_file = "probe_atari_ram.json"
    default_data = "atari_ram"  # configs/data/atari_ram.yaml: the built-in Atari frames, the probe's settings

    def labelled_batches(self, cfg, split: str, spec) -> dict[str, StackBatches]:
        per_game = cfg.probe.train_samples if split == "train" else cfg.probe.get("test_samples")
        refs = select_refs(load_split(spec), per_game, cfg.probe.seed)
        return {game: StackBatches(game_refs, cfg) for game, game_refs in refs.items()}

    def pixels(self) -> torch.nn.Module:
        return LastFramePixels()

    def cache_key(self, cfg) -> list:
        # the stacks are sampled before extraction (the classification target samples features after it)
        return [cfg.probe.train_samples, cfg.probe.get("test_samples"), cfg.probe.seed]

    def evaluate(self, features: dict, cfg) -> dict[str, Any]:
        train, test = features["train"], features["test"]
        missing = sorted(set(train) ^ set(test))
        if missing:
            raise UserError(f"games {missing} are in only one of the train and test splits")
        return evaluate_ram({g: (train[g][0], train[g][1].numpy(), test[g][0], test[g][1].numpy())
                             for g in sorted(train)}, cfg)
