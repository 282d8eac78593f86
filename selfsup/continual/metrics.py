"""Continual-learning metrics: accuracy matrices (row = after task t, column = task j <= t), average
accuracy, forgetting, task-identification accuracy; printed as a table, saved as JSON, and drawn as a
picture for TensorBoard."""

from __future__ import annotations

import numpy as np


def matrix(rows: list[dict], key: str) -> list[list[float | None]]:
    """Rows of `results` -> a square list matrix (None above the diagonal / where not measured)."""
    n = len(rows)
    out = []
    for row in rows:
        values = row.get(key) or []
        out.append([values[j] if j < len(values) and values[j] is not None else None for j in range(n)])
    return out


def average(m: list[list[float | None]]) -> list[float | None]:
    out = []
    for t, row in enumerate(m):
        seen = [v for v in row[: t + 1] if v is not None]
        out.append(float(np.mean(seen)) if seen else None)
    return out


def forgetting(m: list[list[float | None]]) -> list[float | None]:
    """After task t (t >= 1): the mean over earlier tasks j of (best earlier accuracy on j - now)."""
    out: list[float | None] = [None]
    for t in range(1, len(m)):
        drops = []
        for j in range(t):
            before = [m[s][j] for s in range(j, t) if m[s][j] is not None]
            if before and m[t][j] is not None:
                drops.append(max(before) - m[t][j])
        out.append(float(np.mean(drops)) if drops else None)
    return out


# accuracy matrices: key -> title (the unsuffixed class-incremental keys are ConTraCon's entropy rule)
MATRICES = {
    "til": "task-incremental accuracy",
    "cil": "class-incremental accuracy, task by entropy",
    "task_id": "task identification by entropy",
    "cil_mahalanobis": "class-incremental accuracy, task by Mahalanobis",
    "task_id_mahalanobis": "task identification by Mahalanobis",
}
FORGETTING = ("til", "cil", "cil_mahalanobis")


def summarise(rows: list[dict], task_classes: list[list[int]]) -> dict:
    summary: dict = {"tasks_done": len(rows), "task_classes": task_classes}
    for key in MATRICES:
        summary[key] = m = matrix(rows, key)
        summary[f"average_{key}"] = average(m)
        if key in FORGETTING:
            summary[f"forgetting_{key}"] = forgetting(m)
    summary.update({
        "params_added": [r["params"] for r in rows],
        "val_til": [r.get("val_acc") for r in rows],
        "train_seconds": [r.get("train_seconds") for r in rows],
        "eval_samples": [{k: r.get(k) for k in ("til_samples", "cil_samples", "cil_mahalanobis_samples")} for r in rows],
    })
    return summary


def _fmt(v) -> str:
    return "    -" if v is None else f"{100 * v:5.1f}"


def table(summary: dict) -> str:
    n = summary["tasks_done"]
    lines = []
    for key, title in MATRICES.items():
        if all(v is None for row in summary[key] for v in row):
            continue
        lines.append(f"{title} (%): row = after task t, column = task j")
        lines.append("after  " + " ".join(f"  T{j + 1:<3}" for j in range(n)) + "    avg  forget")
        avg = summary.get(f"average_{key}", [None] * n)
        fgt = summary.get(f"forgetting_{key}", [None] * n)
        for t, row in enumerate(summary[key]):
            cells = " ".join(f"{_fmt(v):>6}" if j <= t else "      " for j, v in enumerate(row))
            lines.append(f"T{t + 1:<5} {cells}  {_fmt(avg[t])}  {_fmt(fgt[t]) if fgt else '    -'}")
        lines.append("")
    lines.append("parameters trained per task: " + ", ".join(f"T{t + 1} {p:,}" for t, p in enumerate(summary["params_added"])))
    return "\n".join(lines)


def matrix_picture(m: list[list[float | None]], title: str, cell: int = 44) -> np.ndarray:
    """An accuracy matrix as an HWC uint8 heat map with the numbers written in (white = 0 %, dark
    green = 100 %; grey above the diagonal)."""
    from PIL import Image, ImageDraw

    n = len(m)
    margin, top = 34, 20
    canvas = Image.new("RGB", (margin + n * cell + 4, top + margin + n * cell + 4), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill=(0, 0, 0))
    for j in range(n):
        draw.text((margin + j * cell + cell // 2 - 6, top + 6), f"T{j + 1}", fill=(0, 0, 0))
    for t in range(n):
        draw.text((4, top + margin + t * cell + cell // 2 - 6), f"T{t + 1}", fill=(0, 0, 0))
        for j in range(n):
            x, y = margin + j * cell, top + margin + t * cell
            v = m[t][j]
            if v is None:
                colour, text = (225, 225, 225), ""
            else:
                colour = (int(255 - 255 * v), int(255 - 135 * v), int(255 - 255 * v))
                text = f"{100 * v:.1f}"
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=colour)
            if text:
                draw.text((x + 6, y + cell // 2 - 6), text, fill=(255, 255, 255) if v > 0.6 else (0, 0, 0))
    return np.asarray(canvas)
