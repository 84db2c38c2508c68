"""SVG line charts drawn on the server: the run report's plots and the labelling dashboard's.

A chart is one self-contained ``<svg>`` string: no script, no external file, and its look is set by
presentation attributes, so it renders the same in any page (a page's CSS may still restyle the
classes it carries). Every piece of text that reaches the SVG (series names, titles, tick labels) is
escaped here: they can hold model outputs, round names and usernames.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]

# Presentation attributes per element class (what a stylesheet would otherwise say).
TEXT_STYLE = {
    "title": 'font-size="13" font-weight="600" text-anchor="middle"',
    "tick": 'font-size="10" fill="#555"',
    "label": 'font-size="11" fill="#333" text-anchor="middle"',
    "legend": 'font-size="11" fill="#333"',
    "nodata": 'font-size="14" fill="#999" text-anchor="middle"',
}
LINE_STYLE = {
    "frame": 'fill="none" stroke="#bbb"',
    "grid": 'stroke="#eee"',
    "axis": 'stroke="#888"',
    "hline": 'stroke="#999" stroke-dasharray="4 3"',
}


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    right: bool = False  # plotted against the right-hand axis
    errors: list[tuple[float, float]] | None = None  # (low, high) per point: interval whiskers
    dashed: bool = False


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 x 10^k apart) covering [lo, hi]."""
    if hi <= lo:
        lo, hi = lo - 0.5 if lo == hi else hi, hi + 0.5
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    v = first
    while v < hi + step * 0.999:
        ticks.append(round(v, 10))
        v += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 10000 or abs(v) < 0.001:
        return f"{v:.1e}"
    return f"{v:.4g}"


def _legend_rows(names: Sequence[str], room: float) -> int:
    rows, used = 1, 0.0
    for name in names:
        w = 24 + 6.5 * len(name)
        if used + w > room and used > 0:
            rows, used = rows + 1, 0.0
        used += w
    return rows


def _text(cls: str, x: float | str, y: float | str, content: str, extra: str = "") -> str:
    return f'<text x="{x}" y="{y}" class="{cls}" {TEXT_STYLE[cls]}{extra}>{html.escape(content)}</text>'


def line_chart(plot_id: str, title: str, series: Sequence[Series], xlabel: str, ylabel: str,
               y2label: str | None = None, x_names: dict[float, str] | None = None,
               hline: float | None = None, y_range: tuple[float, float] | None = None,
               width: int = 560, height: int = 300) -> str:
    """An SVG line chart with axes, ticks, labels and a legend; "no data" when every series is empty.

    ``x_names`` puts named ticks at those x values (and only there); ``y_range`` fixes the left axis
    (e.g. [-1, 1] for a correlation) instead of fitting it to the data.
    """
    series = [s for s in series if s.points]
    esc = html.escape

    def svg_open(h: int, css: str) -> str:
        return (f'<svg class="{css}" data-plot="{esc(plot_id)}" xmlns="http://www.w3.org/2000/svg" '
                f'width="{width}" height="{h}" viewBox="0 0 {width} {h}" role="img" '
                f'aria-label="{esc(title)}"><title>{esc(title)}</title>' + _text("title", width / 2, 18, title))

    if not series:
        return svg_open(height, "plot empty") + _text("nodata", width / 2, height / 2, "no data") + "</svg>"
    left, right, top, bottom = 62, (62 if y2label else 18), 30, 72
    pw, ph = width - left - right, height - top - bottom
    legend_rows = _legend_rows([s.name + (" (right axis)" if s.right else "") for s in series], width - left - 8)

    def bounds(group: list[Series]) -> list[float]:
        ys = [y for s in group for _, y in s.points] + [v for s in group for e in (s.errors or []) for v in e]
        if hline is not None and not group[0].right:
            ys.append(hline)
        return nice_ticks(min(ys), max(ys))

    xs = [x for s in series for x, _ in s.points]
    xt = sorted(x_names) if x_names else nice_ticks(min(xs), max(xs))
    x0, x1 = (xt[0] - 0.5, xt[-1] + 0.5) if x_names else (xt[0], xt[-1])
    axes = {False: nice_ticks(*y_range) if y_range else bounds([s for s in series if not s.right] or series)}
    if any(s.right for s in series):
        axes[True] = bounds([s for s in series if s.right])

    def px(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1) * pw

    def py(y: float, right_axis: bool) -> float:
        t = axes[right_axis]
        return top + ph - (y - t[0]) / ((t[-1] - t[0]) or 1) * ph

    out = [svg_open(height + 16 * (legend_rows - 1), "plot"),
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame" {LINE_STYLE["frame"]}/>']
    for x in xt:
        label = x_names[x] if x_names else _fmt(x)
        out.append(f'<line x1="{px(x):.1f}" y1="{top + ph}" x2="{px(x):.1f}" y2="{top + ph + 4}" class="axis" '
                   f'{LINE_STYLE["axis"]}/>' + _text("tick", f"{px(x):.1f}", top + ph + 16, label,
                                                     ' text-anchor="middle"'))
    for right_axis, ticks in axes.items():
        anchor, xpos = ("start", left + pw + 6) if right_axis else ("end", left - 6)
        for y in ticks:
            out.append(_text("tick", xpos, f"{py(y, right_axis) + 4:.1f}", _fmt(y), f' text-anchor="{anchor}"'))
            if not right_axis:
                out.append(f'<line x1="{left}" y1="{py(y, False):.1f}" x2="{left + pw}" y2="{py(y, False):.1f}" '
                           f'class="grid" {LINE_STYLE["grid"]}/>')
    out.append(_text("label", left + pw / 2, top + ph + 34, xlabel))
    out.append(f'<text transform="translate(14 {top + ph / 2}) rotate(-90)" class="label" {TEXT_STYLE["label"]}>'
               f'{esc(ylabel)}</text>')
    if y2label and True in axes:
        out.append(f'<text transform="translate({width - 10} {top + ph / 2}) rotate(90)" class="label" '
                   f'{TEXT_STYLE["label"]}>{esc(y2label)}</text>')
    if hline is not None:
        out.append(f'<line x1="{left}" y1="{py(hline, False):.1f}" x2="{left + pw}" y2="{py(hline, False):.1f}" '
                   f'class="hline" {LINE_STYLE["hline"]}/>')
    legend_x, legend_y = left, top + ph + 50
    for i, s in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        pts = sorted(s.points) if not s.errors else s.points
        path = " ".join(f"{px(x):.1f},{py(y, s.right):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash} '
                   f'class="series"><title>{esc(s.name)}</title></polyline>')
        if len(pts) <= 40:
            out += [f'<circle cx="{px(x):.1f}" cy="{py(y, s.right):.1f}" r="3" fill="{colour}"/>' for x, y in pts]
        for (x, _), (lo, hi) in zip(s.points, s.errors or [], strict=False):
            out.append(f'<line x1="{px(x):.1f}" y1="{py(lo, s.right):.1f}" x2="{px(x):.1f}" y2="{py(hi, s.right):.1f}" '
                       f'stroke="{colour}" stroke-width="1.5" class="whisker"/>')
        name = s.name + (" (right axis)" if s.right else "")
        item_width = 24 + 6.5 * len(name)
        if legend_x + item_width > width - 8 and legend_x > left:  # wrap onto the next legend row
            legend_x, legend_y = left, legend_y + 16
        out.append(f'<line x1="{legend_x}" y1="{legend_y - 4}" x2="{legend_x + 14}" y2="{legend_y - 4}" '
                   f'stroke="{colour}" stroke-width="3"{dash}/>' + _text("legend", legend_x + 18, legend_y, name))
        legend_x += item_width
    out.append("</svg>")
    return "".join(out)
