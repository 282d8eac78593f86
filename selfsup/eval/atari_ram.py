"""`submit probe RUN data=atari_ram`: the AtariARI-style probe (Anand et al. 2019) of a frozen encoder.

For every game and every annotated RAM variable (selfsup.data.atari.RAM_VARIABLES) a linear
classifier predicts the variable's byte value (up to 256 classes) from the encoder's pooled
representation of a 3-frame stack; the label is the RAM after the stack's last frame. Train on
stacks of the train split, score on the test split (held-out episodes, played with another seed):
weighted F1 per variable (as AtariARI), and the mean over variables. A variable that is constant in
the probe's train split is reported but left out of the mean (any probe gets it right).

The classifier is the L-BFGS logistic regression of selfsup.eval.linear, its L2 penalty chosen on a
validation split carved from the train stacks. Baselines: `random:<backbone>` (the same encoder at
its random init) and `pixels` (the stack's last frame, 84x84 = 7056 values, standardised).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from selfsup.errors import UserError

ATARI_DATA = ("atari", "atari_ram")


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


def encode_refs(backbone, refs: list[tuple], cfg: DictConfig, device, desc: str) -> tuple[torch.Tensor, np.ndarray]:
    """Features of the stacks o_t and the RAM after each stack ([N, D] float, [N, 128] uint8)."""
    import torch.nn.functional as F

    from selfsup.progress import progress_bar

    mean = torch.tensor(list(cfg.data.mean)).view(1, 3, 1, 1)
    std = torch.tensor(list(cfg.data.std)).view(1, 3, 1, 1)
    size = int(cfg.data.image_size)
    feats = []
    bs = int(cfg.probe.batch_size)
    backbone.eval().to(device)
    with torch.no_grad():
        for i in progress_bar(range(0, len(refs), bs), total=-(-len(refs) // bs), desc=desc, unit="batch"):
            part = refs[i : i + bs]
            x = torch.from_numpy(np.stack([c.stack(t) for c, t in part])).float().div_(255)
            if x.shape[-1] != size:
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            x = (x - mean) / std
            feats.append(backbone(x.to(device)).float().cpu())
    ram = np.stack([c.ram_at(t) for c, t in refs])
    return torch.cat(feats), ram


def ram_features(target, cfg: DictConfig, cache_dir: Path | None) -> dict:
    """{game: (train_x, train_ram, test_x, test_ram)}, from the cache when seen before."""
    from selfsup.data.stream import resolve_split

    specs = {split: resolve_split(cfg.data, split) for split in ("train", "test")}
    p = cfg.probe
    key = hashlib.sha1(json.dumps([target.identity, {k: str(v) for k, v in specs.items()}, cfg.data.image_size,
                                   list(cfg.data.mean), list(cfg.data.std), p.train_samples, p.get("test_samples"),
                                   p.seed, type(target.backbone).__name__]).encode()).hexdigest()[:16]
    cache = cache_dir / f"ram-features-{key}.pt" if cache_dir else None
    if cache and cache.exists():
        return torch.load(cache, weights_only=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    per_split = {}
    for split, per_game in (("train", p.train_samples), ("test", p.get("test_samples"))):
        refs = select_refs(load_split(specs[split]), per_game, p.seed)
        per_split[split] = {g: encode_refs(target.backbone, r, cfg, device, f"features {split} {g}") for g, r in refs.items()}
    missing = sorted(set(per_split["train"]) ^ set(per_split["test"]))
    if missing:
        raise UserError(f"games {missing} are in only one of the train and test splits")
    out = {g: (*per_split["train"][g], *per_split["test"][g]) for g in sorted(per_split["train"])}
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save(out, tmp)
        os.replace(tmp, cache)
    return out


def probe_variable(train_x, train_y: np.ndarray, test_x, test_y: np.ndarray, cfg: DictConfig) -> dict:
    """One variable: logistic regression over the byte values seen in train; weighted F1 on test."""
    from sklearn.metrics import f1_score

    from selfsup.eval.linear import select_hyperparameters, train_linear

    p = cfg.probe
    classes = np.unique(train_y)
    result = {"train_values": int(len(classes)), "test_values": int(len(np.unique(test_y)))}
    if len(classes) < 2:
        pred = np.full_like(test_y, classes[0])
        return {**result, "f1": float(f1_score(test_y, pred, average="weighted", zero_division=0)), "constant": True}
    lookup = {int(v): i for i, v in enumerate(classes)}
    ytr = torch.tensor([lookup[int(v)] for v in train_y])
    chosen, _ = select_hyperparameters(train_x, ytr, len(classes), weight_decays=tuple(p.weight_decays),
                                       val_fraction=p.val_fraction, max_iter=p.max_iter,
                                       select_samples=p.select_samples, seed=p.seed)
    clf = train_linear(train_x, ytr, len(classes), max_iter=p.max_iter, **chosen)
    pred = classes[clf.logits(test_x).argmax(1).numpy()]
    return {**result, "f1": float(f1_score(test_y, pred, average="weighted", zero_division=0)),
            "accuracy": float((pred == test_y).mean()), "weight_decay": chosen["weight_decay"], "constant": False}


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


def run_ram_probe(loaded, cfg: DictConfig, target: str) -> dict:
    from omegaconf import OmegaConf

    from selfsup.eval.probe import PixelFeatures

    if isinstance(loaded.backbone, PixelFeatures):
        loaded.backbone = LastFramePixels()
    cache_dir = loaded.run_dir / "probe" if loaded.run_dir else None
    features = ram_features(loaded, cfg, cache_dir)
    result = evaluate_ram(features, cfg)
    result.update({"target": target, "global_step": loaded.step, "data": OmegaConf.to_container(cfg.data),
                   "probe": OmegaConf.to_container(cfg.probe)})
    if loaded.run_dir:
        (loaded.run_dir / "probe_atari_ram.json").write_text(json.dumps(result, indent=1))
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(loaded.run_dir / "tb")) as writer:
            writer.add_scalar("probe/ram_f1_mean", result["mean_f1"], loaded.step)
            for r in result["variables"]:
                writer.add_scalar(f"probe_ram/{r['game']}_{r['variable']}", r["f1"], loaded.step)
    return result
