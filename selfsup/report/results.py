"""The evaluation records in a run folder, as tables: the result file of every eval target that
`submit probe` scored the run on (selfsup.eval.targets: each target lays out its own tables), and the
fine-tune records (`finetune.json`: the run is itself a fine-tune run; `finetune/*.json`: fine-tune
runs made from it). A file that cannot be read becomes a one-line note, not a failed page."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfsup.eval.targets import ResultTable, get_target, target_names

FINETUNE_FILE = "finetune.json"
FINETUNE_FOLDER = "finetune"
MISSING = "–"


@dataclass
class ProbeSection:
    """One eval target's result file: what it is, and its tables (or why there are none)."""

    target: str
    file: str  # relative to the run folder
    facts: list[str] = field(default_factory=list)  # step, data, precision
    tables: list[ResultTable] = field(default_factory=list)
    problem: str | None = None


def _read_json(path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads(path.read_text()), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"not readable JSON ({type(error).__name__})"


def probe_sections(run_dir: Path) -> list[ProbeSection]:
    sections = []
    for name in target_names():
        target = get_target(name)
        path = run_dir / target.result_file
        if not path.is_file():
            continue
        section = ProbeSection(name, target.result_file)
        record, section.problem = _read_json(path)
        if record is not None:
            try:
                section.tables = target.result_type(name, record).tables()
                section.facts = _probe_facts(record)
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                section.problem = f"not a {name} probe result ({type(error).__name__}: {error})"
        sections.append(section)
    return sections


def _probe_facts(record: dict) -> list[str]:
    data = record.get("data") or {}
    facts = [f"step {record['global_step']}" if "global_step" in record else None,
             f"data {data['name']}" if data.get("name") else None,
             f"probed {record['target']}" if record.get("target") else None,
             f"precision {record['precision']}" if record.get("precision") else None]
    return [f for f in facts if f]


FINETUNE_COLUMNS = ["run", "source", "labels", "top-1", "top-5", "random init top-1", "random init top-5",
                    "top-1 gain"]


def finetune_files(run_dir: Path) -> list[Path]:
    own = [run_dir / FINETUNE_FILE] if (run_dir / FINETUNE_FILE).is_file() else []
    made = sorted((run_dir / FINETUNE_FOLDER).glob("*.json")) if (run_dir / FINETUNE_FOLDER).is_dir() else []
    return own + made


def finetune_table(run_dir: Path) -> tuple[ResultTable | None, list[str]]:
    """The fine-tune records as one table (None: there are none), and a note per unreadable file."""
    files = finetune_files(run_dir)
    if not files:
        return None, []
    table = ResultTable("fine-tuned with labels; random init: the same network fine-tuned from scratch",
                        FINETUNE_COLUMNS)
    notes = []
    for path in files:
        shown = path.relative_to(run_dir).as_posix()
        record, problem = _read_json(path)
        if problem is None and not isinstance(record, dict):
            problem = "not a JSON object"
        if problem is not None:
            notes.append(f"{shown}: {problem}")
            continue
        own = path == run_dir / FINETUNE_FILE
        table.rows.append(finetune_row(record, "this run" if own else (record.get("run") or shown)))
    return (table if table.rows else None), notes


def finetune_row(record: dict, name: str) -> list[str]:
    baseline = record.get("baseline") if isinstance(record.get("baseline"), dict) else {}
    top1, base1 = _number(record.get("top1")), _number(baseline.get("top1"))
    gain = f"{top1 - base1:+.2f}" if top1 is not None and base1 is not None else MISSING
    return [str(name), str(record.get("source") or MISSING),
            _fraction(record.get("label_fraction")), _score(record.get("top1")), _score(record.get("top5")),
            _score(baseline.get("top1")), _score(baseline.get("top5")), gain]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _score(value: Any) -> str:
    number = _number(value)
    return MISSING if number is None else f"{number:.2f}"


def _fraction(value: Any) -> str:
    number = _number(value)
    return MISSING if number is None else f"{number * 100:g} %"
