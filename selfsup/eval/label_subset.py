"""The labels a fine-tuning run may use: a validation split carved from train, and a fixed,
class-balanced, seeded fraction of the rest (the semi-supervised protocol: 1% or 10% of the labels).

Both are drawn per class from the train split's keys, so the same data, fraction and seed give the
same samples on any machine and any number of ranks. The choice is written into the run folder
(`labels.json`) and read back on resume.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from selfsup.core.atomic import write_text_atomic
from selfsup.core.errors import UserError

LABELS_FILE = "labels.json"


@dataclass(frozen=True)
class LabelSubset:
    train: tuple[str, ...]  # the keys trained on
    val: tuple[str, ...]  # the keys the best step is chosen on
    num_classes: int
    per_class: dict[int, int]  # class -> labelled train samples

    def record(self) -> dict:
        return {"train": list(self.train), "val": list(self.val), "num_classes": self.num_classes,
                "per_class": {str(k): v for k, v in sorted(self.per_class.items())}}


def draw_subset(keys: list[str], labels: list[int], *, fraction: float, val_samples: int, seed: int) -> LabelSubset:
    """Per class: `val_samples` spread over the classes in proportion to their size (at least one each),
    then `fraction` of the class's whole count from what is left (at least one)."""
    if len(set(keys)) != len(keys):
        raise UserError("the train shards repeat sample keys (__key__): a labelled subset needs unique keys; "
                        "write the shards with `submit shards`")
    by_class: dict[int, list[str]] = defaultdict(list)
    for key, label in zip(keys, labels):
        if label >= 0:
            by_class[label].append(key)
    if not by_class:
        raise UserError("the train shards carry no class labels (cls): fine-tuning needs labelled shards")
    total = sum(len(v) for v in by_class.values())
    if val_samples >= total:
        raise UserError(f"finetune.val_samples={val_samples} leaves nothing to train on ({total} labelled train "
                        f"samples): use fewer than {total}")
    rng = random.Random(seed)
    train, val, per_class = [], [], {}
    for label in sorted(by_class):
        members = sorted(by_class[label])
        rng.shuffle(members)
        n_val = max(1, round(val_samples * len(members) / total)) if val_samples else 0
        n_train = max(1, round(fraction * len(members)))
        chosen = members[n_val:n_val + n_train]
        if not chosen:
            raise UserError(f"class {label} has {len(members)} samples, all of them taken by validation: "
                            "lower finetune.val_samples")
        val += members[:n_val]
        train += chosen
        per_class[label] = len(chosen)
    return LabelSubset(tuple(train), tuple(val), max(by_class) + 1, per_class)


def load_or_draw(run_dir: Path, train_spec, *, fraction: float, val_samples: int, seed: int,
                 num_workers: int = 1) -> LabelSubset:
    """The run's subset: read from its `labels.json`, else drawn from the train shards and written there."""
    path = Path(run_dir) / LABELS_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        return LabelSubset(tuple(saved["train"]), tuple(saved["val"]), int(saved["num_classes"]),
                           {int(k): v for k, v in saved["per_class"].items()})
    from selfsup.data.stream import sample_labels

    keys, labels = sample_labels(train_spec, num_workers=num_workers)
    subset = draw_subset(keys, labels, fraction=fraction, val_samples=val_samples, seed=seed)
    write_text_atomic(path, json.dumps(subset.record()))
    return subset
