"""benchmarks/gpu_suite.py runs end to end on a CPU (--tiny) and writes the tables it promises; its
out-of-memory fallback and its time limit do what they say. benchmarks/probe_scale.py (--tiny) times
every solver it compares."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_common  # noqa: E402
import gpu_suite  # noqa: E402
import probe_scale  # noqa: E402


def markdown_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """{section title: rows as {column: cell}} of every `## title` followed by a table."""
    tables, title, header = {}, None, None
    for line in text.splitlines():
        if line.startswith("## "):
            title, header = line[3:], None
            tables[title] = []
        elif line.startswith("|") and title is not None:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(line) <= set("|-: "):
                tables[title].append(dict(zip(header, cells, strict=True)))
    return tables


def positive(cell: str) -> float:
    value = float(cell.rstrip("%"))
    assert value > 0, cell
    return value


def test_tiny_suite_writes_every_table_and_reports_a_failing_case(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_common, "BENCH_TMP", tmp_path / "bench")  # the data section's shards
    out = tmp_path / "suite.md"
    # obow on a ViT is refused by selfsup: its row must say so while the other rows are measured
    gpu_suite.main(["--tiny", "--only", "rotnet,spark,obow", "--backbone", "obow=vit_tiny_test", "--budget-s", "240",
                    "--out", str(out)], started=time.monotonic())
    text = out.read_text()
    assert "Machine: " in text and " cores" in text
    tables = markdown_tables(text)
    methods, spark, data = (next(rows for title, rows in tables.items() if title.startswith(n)) for n in ("1.", "2.", "3."))

    assert [r["method"] for r in methods] == ["rotnet", "obow", "spark"]
    for row in (methods[0], methods[2]):
        assert row["device"] == "cpu" and row["px"] == "32"
        for column in ("selfsup images/s", "bare loop images/s", "overhead (selfsup / bare time)", "GFLOP/image", "TFLOP/s"):
            positive(row[column])
        # the ratio is the two step times' ratio, i.e. the inverse ratio of the images/s
        ratio = float(row["bare loop images/s"]) / float(row["selfsup images/s"])
        assert float(row["overhead (selfsup / bare time)"]) == pytest.approx(ratio, rel=0.1)
    assert methods[1]["note"].startswith("failed: UserError") and "vit_tiny_test" in methods[1]["note"]
    assert methods[1]["selfsup images/s"] == "-"

    assert [(r["backbone"], r["measured"]) for r in spark] == [("resnet_tiny", "encoder fwd+bwd"), ("resnet_tiny", "full step")]
    for row in spark:
        for column in ("masked (s)", "sparse (s)", "sparse / masked", "masked images/s", "sparse images/s"):
            positive(row[column])

    assert [(r["view"], r["gpu_augment"]) for r in data] == [("spark", "off"), ("spark", "on")]
    assert data[1]["augmentations run"] == "batched, workers"  # no GPU: batched in the workers
    for row in data:
        positive(row["images/s"])


def test_out_of_memory_halves_the_batch_until_it_fits():
    tried = []

    def run(batch):
        tried.append(batch)
        if batch > 6:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return batch * 10

    assert gpu_suite.shrinking_batch(run, 24, torch.device("cpu")) == (60, 6, "out of memory at batch 24, 12")
    assert tried == [24, 12, 6]

    def never_fits(batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError, match="batch 4, 2, 1"):
        gpu_suite.shrinking_batch(never_fits, 4, torch.device("cpu"))


def test_time_limit_ends_a_runaway_item_and_keeps_an_outer_alarm():
    import signal

    outer = []
    previous = signal.signal(signal.SIGALRM, lambda *_: outer.append(True))
    signal.setitimer(signal.ITIMER_REAL, 30.0)
    try:
        start = time.monotonic()
        with pytest.raises(gpu_suite.TimeLimit):
            with gpu_suite.hard_limit(0.2):
                while time.monotonic() - start < 10:
                    time.sleep(0.01)
        assert time.monotonic() - start < 5
        left = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 20 < left <= 30  # the outer alarm is set again, less the time spent
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not outer


def test_probe_scale_tiny_times_the_batched_sweep_one_pair_at_a_time_and_lbfgs(tmp_path):
    out = tmp_path / "probe.md"
    probe_scale.main(["--tiny", "--out", str(out)])
    lines = out.read_text().splitlines()
    assert lines[0].startswith("Machine: ") and "2 epochs at batch 256, 5 penalties x 3 learning rates" in lines[2]
    header = [c.strip() for c in lines[4].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[6:]]
    assert [r["solver"] for r in rows] == ["all 15 pairs at once", "one pair at a time",
                                          "L-BFGS (5 penalties on 500, refit on all)"]
    assert all(r["train samples x dim x classes"] == "2,000 x 32 x 10" and r["device"] == "cpu" for r in rows)
    assert rows[0]["measured"] == rows[1]["measured"] == "2 x 3 steps timed"
    for r in rows:
        assert positive(r["per step / iteration"].split(" s ")[0]) and "(extrapolated" in r["whole probe"]
    assert rows[1]["note"].endswith("x the batched time") and positive(rows[1]["note"].split("x ")[0])
