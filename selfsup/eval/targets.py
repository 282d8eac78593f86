"""Evaluation targets: what the features of a frozen backbone are scored on, found by name.

A data config names its target (`data.eval_target`, configs/data/*.yaml; the default is in
configs/defaults.yaml), so a run on Atari frames is probed on RAM variables and a run on labelled
images on their classes, without the probe knowing either. A target reads its labelled data as
batches of `image` and `label`, the probe's shared extraction turns them into features, and the
target fits and scores its probe on those features. Adding a target is a module that calls
`register_target`, listed in TARGET_MODULES; nothing else is edited.

Cheap to import (no torch): the target modules are imported on the first look-up.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from selfsup.core.errors import UserError, unknown_choice

# the modules that register the targets (imported on the first look-up, not by this module's import:
# they import torch, and they import this module)
TARGET_MODULES = ("selfsup.eval.classification", "selfsup.eval.atari_ram")


# what a result's `baselines` (`probe.baselines=true`) are called where they are shown
BASELINE_LABELS = {"random_init": "same network, random init", "pixels": "raw pixels"}


@dataclass
class ResultTable:
    """One table of a result, its cells already formatted, for a reader other than the terminal
    (`submit report` draws it as HTML)."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)


class ProbeResult(Mapping[str, Any]):
    """The scores of one target's probe: the JSON record it writes into the run folder, read as a
    mapping (`result["linear"]["top1"]`), tagged with the name of the target that made it."""

    def __init__(self, eval_target: str, record: dict[str, Any]):
        self.eval_target = eval_target
        self.record = record

    def __getitem__(self, key: str) -> Any:
        return self.record[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.record)

    def __len__(self) -> int:
        return len(self.record)

    @abstractmethod
    def table(self, title: str) -> str:
        """The result as the table `submit probe` prints."""

    @abstractmethod
    def tables(self) -> list[ResultTable]:
        """The same scores as `table`, as structured tables."""

    @abstractmethod
    def scalars(self) -> dict[str, float]:
        """TensorBoard tag -> value."""

    @abstractmethod
    def headline(self, record: dict[str, Any]) -> dict[str, float]:
        """The scores of `record` (this result's, or one of its baselines') that a comparison reads:
        column name -> score, higher is better."""

    score_format: ClassVar[str] = "{:.2f}"

    def baseline_table(self) -> ResultTable | None:
        """This backbone's headline scores beside its baselines' (`probe.baselines=true`) and the margin
        over the best of them; None when no baseline was probed."""
        baselines = self.record.get("baselines") or {}
        if not baselines:
            return None
        own = self.headline(self.record)
        scored = {role: self.headline(record) for role, record in baselines.items()}
        rows = [["this backbone", *(self.score_format.format(v) for v in own.values())]]
        rows += [[BASELINE_LABELS.get(role, role), *(self.score_format.format(v) for v in scores.values())]
                 for role, scores in scored.items()]
        margins = [own[column] - max(scores[column] for scores in scored.values()) for column in own]
        rows.append(["margin over the best baseline", *(("+" if m >= 0 else "") + self.score_format.format(m)
                                                          for m in margins)])
        return ResultTable("beside the baselines (the same data and probe settings)", ["features", *own], rows)

    def baseline_lines(self) -> list[str]:
        """`baseline_table` as lines of the text table `submit probe` prints ([] without baselines)."""
        table = self.baseline_table()
        if table is None:
            return []
        width = max(len(row[0]) for row in table.rows) + 2
        lines = [f"  {table.title}", f"  {'':<{width}}" + "".join(f"{c:>14}" for c in table.columns[1:])]
        return lines + [f"  {row[0]:<{width}}" + "".join(f"{c:>14}" for c in row[1:]) for row in table.rows]


class EvalTarget(ABC):
    """One kind of evaluation. Features arrive as `{split: {group: (x [N, D], labels [N, ...])}}` for
    the splits `train` and `test`; a group is a part scored on its own (e.g. one Atari game)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    result_type: ClassVar[type[ProbeResult]]
    result_file: ClassVar[str]  # written into the probed run's folder
    # the data config (configs/data/<name>.yaml) that a run on shards with this target is probed on
    # when no data is given; None: the default data of configs/defaults.yaml
    default_data: ClassVar[str | None] = None
    # whether `probe.layers` may choose layers to score one by one (`layer_row`); False: the final
    # pooled features only, and probe.layers is refused
    scores_layers: ClassVar[bool] = False
    # whether a split's features may be extracted shard block by shard block on several ranks and
    # concatenated (selfsup.eval.feature_parts): the batches are the shards' samples, in order
    splits_by_shard: ClassVar[bool] = False

    @abstractmethod
    def labelled_batches(self, cfg, split: str, spec) -> Mapping[str, Iterable[dict]]:
        """group -> batches (`image`: normalised floats, `label`: a tensor) of the split stored at `spec`."""

    @abstractmethod
    def pixels(self):
        """The raw-pixel baseline of this target's inputs, as a feature extractor (an nn.Module)."""

    @abstractmethod
    def evaluate(self, features: dict, cfg) -> dict[str, Any]:
        """Fit the probe on the train features and score it on the test features: the JSON record."""

    def cache_key(self, cfg) -> list:
        """Settings, besides the data and the backbone, that change which features are extracted."""
        return []

    def layer_row(self, record: dict[str, Any]) -> dict[str, Any]:
        """One layer's row of the per-layer table (`probe.layers`), from `evaluate`'s record of that
        layer's features. Only a target with `scores_layers` has them."""
        raise NotImplementedError(f"the {self.name} eval target probes the final pooled features only")


_REGISTRY: dict[str, EvalTarget] = {}


def register_target(cls: type[EvalTarget]) -> type[EvalTarget]:
    """Class decorator: register one instance of `cls` under `cls.name`."""
    if cls.name in _REGISTRY:
        raise ValueError(f"eval target {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def _import_targets() -> None:
    for module in TARGET_MODULES:
        importlib.import_module(module)


def target_names() -> list[str]:
    _import_targets()
    return sorted(_REGISTRY)


def get_target(name: str) -> EvalTarget:
    _import_targets()
    if name not in _REGISTRY:
        raise unknown_choice("eval target (data.eval_target)", name, _REGISTRY)
    return _REGISTRY[name]


def saved_results(run_dir: str | Path) -> list[ProbeResult]:
    """The results `submit probe` wrote into run folder `run_dir`: one per eval target probed, in the
    order of the targets' names."""
    results = []
    for name in target_names():
        target = _REGISTRY[name]
        path = Path(run_dir) / target.result_file
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"{path}: not a readable probe result ({type(error).__name__}); run `submit probe` again") from None
        results.append(target.result_type(name, record))
    return results
