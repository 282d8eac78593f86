"""Line charts as inline SVG: a value over training steps, one or more series per chart, with a
grid at round values. Plain markup, no script, so the page renders offline and in a screenshot."""

from __future__ import annotations

import math
from html import escape

WIDTH, HEIGHT = 360, 200
# room for the axis labels: left, right, top, bottom
MARGIN = (52, 14, 10, 24)
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")

Series = list[tuple[float, float]]  # (step, value), by step


def round_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` values in [low, high] at a round spacing (1, 2 or 5 times a power of ten)."""
    if high <= low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    # the round spacing nearest to the raw one (its mantissa is in [1, 10))
    spacing = power * next(m for limit, m in ((1.5, 1), (3, 2), (7, 5), (math.inf, 10)) if raw / power < limit)
    first = math.ceil(low / spacing - 1e-9) * spacing
    ticks = []
    value = first
    while value <= high + spacing * 1e-9:
        ticks.append(0.0 if abs(value) < spacing * 1e-9 else value)
        value = first + len(ticks) * spacing
    return ticks


def short_number(value: float) -> str:
    """A tick label: three significant digits, thousands as k and millions as M."""
    for divisor, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= divisor * 10:  # 10k and up; 1000..9999 stay whole
            return f"{value / divisor:.3g}{suffix}"
    return f"{value:.3g}"


def _span(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if high == low:  # a flat series: a band around it
        pad = abs(low) * 0.1 or 1.0
        return low - pad, high + pad
    pad = (high - low) * 0.05
    return low - pad, high + pad


def line_chart(title: str, series: dict[str, Series]) -> str:
    """A <figure>: the title, the chart, and a legend when there is more than one series."""
    points = [p for s in series.values() for p in s]
    x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1
    y_low, y_high = _span([p[1] for p in points])
    left, right, top, bottom = MARGIN
    plot_w, plot_h = WIDTH - left - right, HEIGHT - top - bottom

    def x(step: float) -> float:
        return left + (step - x_low) / (x_high - x_low) * plot_w

    def y(value: float) -> float:
        return top + (y_high - value) / (y_high - y_low) * plot_h

    parts = [f'<rect class="plot" x="{left}" y="{top}" width="{plot_w}" height="{plot_h}"/>']
    for tick in round_ticks(y_low, y_high):
        parts.append(f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}"/>'
                     f'<text class="ylabel" x="{left - 4}" y="{y(tick) + 3:.1f}">{short_number(tick)}</text>')
    for tick in round_ticks(x_low, x_high, count=4):
        parts.append(f'<text class="xlabel" x="{x(tick):.1f}" y="{HEIGHT - 8}">{short_number(tick)}</text>')
    for colour, (name, line) in zip(_colours(len(series)), series.items()):
        if len(line) == 1:  # one point: a dot (a path of one point draws nothing)
            parts.append(f'<circle cx="{x(line[0][0]):.1f}" cy="{y(line[0][1]):.1f}" r="3" fill="{colour}">'
                         f'<title>{escape(name)}</title></circle>')
        else:
            d = "M" + " L".join(f"{x(s):.1f},{y(v):.1f}" for s, v in line)
            parts.append(f'<path d="{d}" stroke="{colour}"><title>{escape(name)}</title></path>')
    svg = (f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
           f'aria-label="{escape(title)}">{"".join(parts)}</svg>')
    legend = ""
    if len(series) > 1:
        legend = '<div class="legend">' + " ".join(
            f'<span><i style="background:{c}"></i>{escape(name)}</span>'
            for c, name in zip(_colours(len(series)), series)) + "</div>"
    return f'<figure class="chart"><figcaption>{escape(title)}</figcaption>{svg}{legend}</figure>'


def _colours(n: int) -> list[str]:
    return [COLOURS[i % len(COLOURS)] for i in range(n)]


# the charts' look, for the page's <style>
CHART_CSS = """
figure.chart { margin: 0; }
figure.chart figcaption { font-weight: 600; font-size: 13px; margin-bottom: 2px; overflow-wrap: anywhere; }
figure.chart svg { display: block; max-width: 100%; height: auto; font-size: 10px; }
figure.chart .plot { fill: #fafafa; stroke: #999; stroke-width: 1; }
figure.chart .grid { stroke: #e2e2e2; stroke-width: 1; }
figure.chart path { fill: none; stroke-width: 1.6; stroke-linejoin: round; }
figure.chart .ylabel { text-anchor: end; fill: #444; }
figure.chart .xlabel { text-anchor: middle; fill: #444; }
figure.chart .legend { font-size: 11px; }
figure.chart .legend span { margin-right: 10px; white-space: nowrap; }
figure.chart .legend i { display: inline-block; width: 10px; height: 3px; margin: 0 4px 3px 0; vertical-align: middle; }
"""
