"""Inline SVG for the HTML report: bar charts, a histogram and a video's shot timeline.

Plain SVG strings, no script and no library, so a report opens offline in any browser.
Every piece of text that comes from the data is escaped here.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

import numpy as np

#: width of the timeline's drawing area, in SVG units (it scales to the page).
_TIMELINE_WIDTH = 1000.0
_LABEL_GUTTER = 150.0


def bar_chart(items: Sequence[tuple[str, float]], title: str, unit: str = "") -> str:
    """Horizontal bars, one per (name, value), largest value full width."""
    if not items:
        return f'<p class="muted">{escape(title)}: nothing to show</p>'
    row, gutter, width = 18, 150, 420
    top = max(value for _, value in items) or 1
    bars = []
    for i, (name, value) in enumerate(items):
        y = i * row
        length = (width - gutter - 50) * value / top
        bars.append(
            f'<text x="{gutter - 6}" y="{y + 13}" text-anchor="end">{escape(_short(name, 24))}</text>'
            f'<rect class="bar" x="{gutter}" y="{y + 3}" width="{length:.1f}" height="{row - 6}">'
            f"<title>{escape(name)}: {value:g}{escape(unit)}</title></rect>"
            f'<text x="{gutter + length + 4:.1f}" y="{y + 13}">{value:g}</text>'
        )
    height = row * len(items)
    return (f'<figure><figcaption><b>{escape(title)}</b></figcaption>'
            f'<svg role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" width="100%">'
            f'{"".join(bars)}</svg></figure>')


def histogram(counts: Sequence[int], low: float, high: float, title: str, unit: str = "s") -> str:
    """Vertical bars of `counts`, the numbers of values in equal-width bins from `low` to `high`
    (binned by the caller: the report counts them in DuckDB, not a list of every video's value)."""
    if not sum(counts):
        return f'<p class="muted">{escape(title)}: nothing to show</p>'
    bins = len(counts)
    edges = np.linspace(low, high, bins + 1)
    width, height, base = 420, 150, 130
    step = width / bins
    top = max(counts) or 1
    bars = []
    for i, count in enumerate(counts):
        h = (base - 12) * count / top
        bars.append(
            f'<rect class="bar" x="{i * step + 1:.1f}" y="{base - h:.1f}" width="{step - 2:.1f}" height="{h:.1f}">'
            f"<title>{edges[i]:.1f}-{edges[i + 1]:.1f}{unit}: {count}</title></rect>"
        )
        if count:
            bars.append(f'<text x="{i * step + step / 2:.1f}" y="{base - h - 2:.1f}" '
                        f'text-anchor="middle">{count}</text>')
    axis = (f'<line class="axis" x1="0" y1="{base}" x2="{width}" y2="{base}"/>'
            f'<text x="0" y="{base + 14}">{low:.1f}{unit}</text>'
            f'<text x="{width}" y="{base + 14}" text-anchor="end">{high:.1f}{unit}</text>')
    return (f'<figure><figcaption><b>{escape(title)}</b></figcaption>'
            f'<svg role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" width="100%">'
            f'{"".join(bars)}{axis}</svg></figure>')


def timeline(
    duration_s: float,
    shots: Sequence[tuple[int, float, float]],
    rows: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    ticks: Sequence[float] = (),
) -> str:
    """A video's shots as alternating blocks, thumbnail times as ticks, and one row per label.

    `shots` are (segment_index, start_s, end_s); `rows` are (label, [(start_s, end_s), ...]).
    """
    duration = max(float(duration_s or 0.0), max((end for _, _, end in shots), default=0.0), 1e-6)
    scale = (_TIMELINE_WIDTH - _LABEL_GUTTER) / duration
    row = 16
    parts = [f'<text x="{_LABEL_GUTTER - 6}" y="22" text-anchor="end">shots</text>']
    for n, (index, start, end) in enumerate(shots):
        x, w = _LABEL_GUTTER + start * scale, max((end - start) * scale, 1.0)
        parts.append(
            f'<rect class="shot shot-{n % 2}" data-segment="{int(index)}" x="{x:.1f}" y="8" '
            f'width="{w:.1f}" height="20"><title>shot {int(index)}: {start:.2f}-{end:.2f}s</title></rect>'
        )
        if w > 18:
            parts.append(f'<text x="{x + 3:.1f}" y="22">{int(index)}</text>')
    for t in ticks:
        x = _LABEL_GUTTER + float(t) * scale
        parts.append(f'<line class="tick" x1="{x:.1f}" y1="30" x2="{x:.1f}" y2="36"/>')
    y = 44
    for label, ranges in rows:
        parts.append(f'<text x="{_LABEL_GUTTER - 6}" y="{y + 11}" text-anchor="end">'
                     f"{escape(_short(label, 22))}</text>")
        for start, end in ranges:
            x, w = _LABEL_GUTTER + start * scale, max((end - start) * scale, 2.0)
            parts.append(f'<rect class="range" x="{x:.1f}" y="{y + 2}" width="{w:.1f}" height="{row - 4}">'
                         f"<title>{escape(label)}: {start:.2f}-{end:.2f}s</title></rect>")
        y += row
    axis_y = y + 4
    parts.append(f'<line class="axis" x1="{_LABEL_GUTTER}" y1="{axis_y}" x2="{_TIMELINE_WIDTH}" y2="{axis_y}"/>')
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = _LABEL_GUTTER + fraction * duration * scale
        anchor = "end" if fraction == 1.0 else "start" if fraction == 0.0 else "middle"
        parts.append(f'<text x="{x:.1f}" y="{axis_y + 14}" text-anchor="{anchor}">{fraction * duration:.1f}s</text>')
    height = axis_y + 20
    return (f'<svg class="timeline" id="timeline" role="img" aria-label="shot timeline" '
            f'viewBox="0 0 {_TIMELINE_WIDTH:.0f} {height}" width="100%">{"".join(parts)}</svg>')


def _short(text: str, limit: int) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
