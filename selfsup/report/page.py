"""The report page of a run folder: one HTML file with everything inside it (charts as inline SVG,
pictures as data URIs, styles in a <style>), so it can be mailed, archived or opened offline.

Sections, by id: `scalars` (the TensorBoard scalars over steps, grouped by the first part of their
tag), `pictures` (the last image of each TensorBoard image tag), `evaluation` (probe results and
fine-tune records) and `config` (config.yaml). A section with nothing to show says so in one line."""

from __future__ import annotations

import base64
import time
from html import escape
from pathlib import Path

import yaml

from selfsup.core.run_folder import CONFIG_FILE
from selfsup.eval.targets import ResultTable
from selfsup.report.events import TB_FOLDER, RunEvents, read_events
from selfsup.report.results import ProbeSection, finetune_table, probe_sections
from selfsup.report.svg import CHART_CSS, Series, line_chart

LR_PREFIX = "lr-"  # Lightning's LearningRateMonitor: lr-<optimizer>[/<parameter group>]
GROUP_ORDER = ("train", "learning rate")  # first; the other groups follow by name, "other" last
PICTURE_WIDTH, MAX_PICTURE_SCALE = 600, 4  # pictures narrower than this are drawn larger, up to 4x

PAGE_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; background: #fff;
       margin: 0 auto; padding: 16px 24px; max-width: 1152px; font-size: 14px; }
h1 { font-size: 22px; margin: 0 0 4px; overflow-wrap: anywhere; }
h2 { font-size: 18px; border-bottom: 1px solid #ccc; padding-bottom: 2px; margin: 24px 0 8px; }
h3 { font-size: 15px; margin: 14px 0 6px; }
.facts { color: #555; margin: 0; }
.empty { color: #777; font-style: italic; margin: 4px 0; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 12px 16px; }
figure.picture { margin: 0 0 14px; }
figure.picture img { max-width: 100%; height: auto; image-rendering: pixelated; border: 1px solid #ddd; }
figure.picture figcaption { font-size: 13px; color: #444; }
table { border-collapse: collapse; margin: 4px 0 12px; font-size: 13px; }
caption { text-align: left; color: #555; padding-bottom: 2px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; overflow-wrap: anywhere; }
th { background: #f3f3f3; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
footer.end { border-top: 2px solid rgb(190, 190, 191); margin-top: 16px; }  /* screenshot.END_MARK */
pre { background: #f7f7f7; border: 1px solid #e2e2e2; padding: 8px; font-size: 12px; overflow-x: auto;
      columns: 3 340px; column-rule: 1px solid #e2e2e2; }
"""


def render_page(run_dir: Path) -> str:
    """The whole page of run folder `run_dir`."""
    config_text = (run_dir / CONFIG_FILE).read_text(errors="replace")
    events = read_events(run_dir)
    title = f"selfsup report: {run_dir.name}"
    return "\n".join([
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">',
        f"<title>{escape(title)}</title>\n<style>{PAGE_CSS}{CHART_CSS}</style>\n</head>\n<body>",
        header(run_dir, config_text, events),
        scalars_section(events, run_dir),
        pictures_section(events, run_dir),
        evaluation_section(run_dir),
        config_section(config_text),
        '<footer class="end"></footer>',  # the end mark that a whole-page PNG is cut under
        "</body>\n</html>\n",
    ])


def header(run_dir: Path, config_text: str, events: RunEvents) -> str:
    try:
        cfg = yaml.safe_load(config_text)
    except yaml.YAMLError:
        cfg = None
    cfg = cfg if isinstance(cfg, dict) else {}
    facts = [f"{key} {cfg[key]['name']}" for key in ("method", "backbone", "data")
             if isinstance(cfg.get(key), dict) and cfg[key].get("name")]
    steps = [p[0] for points in events.scalars.values() for p in points]
    if steps:
        facts.append(f"last logged step {max(steps)}")
    facts.append(f"made {time.strftime('%Y-%m-%d %H:%M')}")
    return (f'<header id="run"><h1>{escape(run_dir.name)}</h1>'
            f'<p class="facts">{escape(" · ".join(facts))}</p></header>')


def scalar_groups(scalars: dict[str, Series]) -> list[tuple[str, dict[str, dict[str, Series]]]]:
    """[(group, {chart title: {series name: points}})]: one chart per tag, except the learning rates
    of one optimizer, drawn together (one series per parameter group)."""
    groups: dict[str, dict[str, dict[str, Series]]] = {}
    for tag, points in scalars.items():
        if tag.startswith(LR_PREFIX):
            group, chart = "learning rate", tag.split("/")[0]
        else:
            group, chart = (tag.split("/")[0] if "/" in tag else "other"), tag
        groups.setdefault(group, {}).setdefault(chart, {})[tag] = points
    order = [g for g in GROUP_ORDER if g in groups] + sorted(g for g in groups if g not in GROUP_ORDER + ("other",))
    order += ["other"] if "other" in groups else []
    return [(g, dict(sorted(groups[g].items(), key=_loss_first))) for g in order]


def _loss_first(chart: tuple[str, dict]) -> tuple[bool, str]:
    """A group's loss chart first (`train/loss` before the terms), then the charts by title."""
    title = chart[0]
    return not title.endswith("/loss") or title.count("/") > 1, title


def scalars_section(events: RunEvents, run_dir: Path) -> str:
    """A chart per tag logged at several steps; the tags logged once (a probe's scores, say) in a
    table of their group."""
    body = [f'<p class="facts">TensorBoard scalars of {escape(str(run_dir / TB_FOLDER))} over training steps</p>']
    for group, charts in scalar_groups(events.scalars):
        drawn = {title: series for title, series in charts.items() if any(len(s) > 1 for s in series.values())}
        once = [[tag, str(points[0][0]), f"{points[0][1]:.6g}"] for title, series in charts.items()
                if title not in drawn for tag, points in series.items()]
        body.append(f"<h3>{escape(group)}</h3>")
        if drawn:
            body.append('<div class="charts">' + "".join(line_chart(t, s) for t, s in drawn.items()) + "</div>")
        if once:
            body.append(table_html(ResultTable("logged at one step", ["tag", "step", "value"], once)))
    if not events.scalars:
        body = [_empty(f"No TensorBoard scalars in {run_dir / TB_FOLDER}.")]
    return _section("scalars", "Training scalars", body)


def pictures_section(events: RunEvents, run_dir: Path) -> str:
    body = []
    for picture in events.pictures:
        uri = f"data:{picture.mime};base64,{base64.b64encode(picture.data).decode('ascii')}"
        # a small picture is shown a whole number of times larger (its pixels stay sharp)
        scale = max(1, min(MAX_PICTURE_SCALE, PICTURE_WIDTH // max(picture.width, 1)))
        body.append(f'<figure class="picture"><img src="{uri}" alt="{escape(picture.tag)}" '
                    f'width="{picture.width * scale}" height="{picture.height * scale}">'
                    f"<figcaption>{escape(picture.tag)}, step {picture.step}</figcaption></figure>")
    if not body:
        body = [_empty(f"No TensorBoard pictures in {run_dir / TB_FOLDER}.")]
    return _section("pictures", "Pictures", body)


def evaluation_section(run_dir: Path) -> str:
    body = ['<h3 id="probe">Probes (submit probe)</h3>']
    sections = probe_sections(run_dir)
    body += [probe_html(s) for s in sections] or [_empty("No probe results: run submit probe on this run.")]
    body.append('<h3 id="finetune">Fine-tuning</h3>')
    table, notes = finetune_table(run_dir)
    if table is not None:
        body.append(table_html(table))
    body += [_empty(note) for note in notes]
    if table is None and not notes:
        body.append(_empty("No fine-tune records (finetune.json, finetune/*.json)."))
    return _section("evaluation", "Evaluation", body)


def probe_html(section: ProbeSection) -> str:
    facts = " · ".join([section.file, *section.facts])
    parts = [f'<div class="probe" data-target="{escape(section.target)}">'
             f'<p class="facts"><b>{escape(section.target)}</b> · {escape(facts)}</p>']
    if section.problem:
        parts.append(_empty(f"{section.file}: {section.problem}"))
    parts += [table_html(t) for t in section.tables]
    return "".join(parts) + "</div>"


def table_html(table: ResultTable) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in table.columns)
    rows = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in table.rows)
    return f"<table><caption>{escape(table.title)}</caption><tr>{head}</tr>{rows}</table>"


def _cell(text: str) -> str:
    try:
        float(text.replace(" %", ""))
        return f'<td class="number">{escape(text)}</td>'
    except ValueError:
        return f"<td>{escape(text)}</td>"


def config_section(config_text: str) -> str:
    body = [f"<pre>{escape(config_text)}</pre>"] if config_text.strip() else [_empty(f"{CONFIG_FILE} is empty.")]
    return _section("config", f"Config ({CONFIG_FILE})", body)


def _section(section_id: str, title: str, body: list[str]) -> str:
    return f'<section id="{section_id}">\n<h2>{escape(title)}</h2>\n' + "\n".join(body) + "\n</section>"


def _empty(line: str) -> str:
    return f'<p class="empty">{escape(line)}</p>'
