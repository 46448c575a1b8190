"""Server-rendered SVG line charts: no script, no external asset, readable with JavaScript off.

Every point is a ``<circle>`` carrying its series, its bucket and its value (``data-*``) and a
``<title>`` (the tooltip), so the page's table beside the chart and the chart can be checked
against each other.
"""
from __future__ import annotations

import math
from html import escape

from markupsafe import Markup

# Distinct on white and for the common colour-vision deficiencies (Okabe-Ito, darkened a little).
PALETTE = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#7a5c00", "#444444",
           "#a6192e", "#5b2a86"]


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def nice_ceiling(value: float) -> float:
    """A round number at or above ``value`` (1, 2, 2.5, 5 times a power of ten)."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for m in (1, 2, 2.5, 5, 10):
        if value <= m * power:
            return m * power
    return 10 * power


def tick(value: float) -> str:
    """An axis label: short, no trailing zeros."""
    if value == 0:
        return "0"
    if abs(value) >= 1_000_000:
        return f"{value / 1_000_000:g}M"
    if abs(value) >= 10_000:
        return f"{value / 1_000:g}k"
    return f"{value:g}"


def fmt(value: float | int | None, measure: str) -> str:
    """A value as the page's tables show it (the chart's tooltips say the same)."""
    if value is None:
        return "–"
    if measure == "executions":
        return f"{int(value):,}"
    if measure == "failure_rate":
        return f"{value:.2f}"
    if measure == "credits":
        return f"{value:,.2f}"
    return f"{value:.3f}"


def line_chart(labels: list[str], series: list[dict], measure: str, title: str, *, width: int = 640,
               height: int = 240) -> Markup:
    """A line chart of ``series`` (each ``{"workspace": name, "points": [value or None, ...]}``,
    one value per label); a gap where a value is missing."""
    left, right, top, bottom = 56, 26, 14, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for s in series for v in s["points"] if v is not None]
    y_max = nice_ceiling(max(values) if values else 1.0)
    n = len(labels)

    def x(i: int) -> float:
        return left + (plot_w / 2 if n == 1 else plot_w * i / (n - 1))

    def y(v: float) -> float:
        return top + plot_h - plot_h * (v / y_max)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}" '
             f'data-measure="{escape(measure)}">', f"<title>{escape(title)}</title>"]
    for k in range(5):  # horizontal grid and the y axis' labels
        v = y_max * k / 4
        parts.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>')
        parts.append(f'<text class="axis" x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{tick(v)}</text>')
    step = max(1, math.ceil(n / 8))  # at most ~8 time labels
    for i in range(0, n, step):
        parts.append(f'<text class="axis" x="{x(i):.1f}" y="{height - 12}" text-anchor="middle">'
                     f'{escape(short(labels[i]))}</text>')
    parts.append(f'<line class="frame" x1="{left}" x2="{width - right}" y1="{top + plot_h}" y2="{top + plot_h}"/>')
    for si, s in enumerate(series):
        c = color(si)
        run: list[str] = []
        runs: list[list[str]] = []
        for i, v in enumerate(s["points"]):
            if v is None:
                if run:
                    runs.append(run)
                run = []
                continue
            run.append(f"{x(i):.1f},{y(v):.1f}")
        if run:
            runs.append(run)
        for r in runs:
            if len(r) > 1:
                parts.append(f'<polyline class="line" fill="none" stroke="{c}" stroke-width="2" points="{" ".join(r)}"/>')
        for i, v in enumerate(s["points"]):
            if v is None:
                continue
            name = escape(str(s["workspace"]))
            parts.append(f'<circle class="point" cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="{c}" '
                         f'data-series="{name}" data-label="{escape(labels[i])}" data-value="{v!r}">'
                         f'<title>{name} · {escape(labels[i])}: {escape(fmt(v, measure))}</title></circle>')
    parts.append("</svg>")
    return Markup("".join(parts))


def short(label: str) -> str:
    """A bucket label shortened for an axis: an hour as 'MM-DD HH', a day as 'MM-DD'."""
    if "T" in label:
        return f"{label[5:10]} {label[11:13]}h"
    if len(label) == 10:
        return label[5:]
    return label
