"""The labelling dashboard's inline SVG charts, drawn on the server (no JavaScript, no chart library in
the browser): progress bars and win-rate intervals here, line charts by ``alignloop.plots``.

All text that reaches the SVG (round names, model names, usernames) is escaped.
"""

from __future__ import annotations

from markupsafe import Markup, escape

from alignloop import plots

W, ROW, LEFT = 560, 26, 170


def _svg(height: int, body: str, title: str) -> Markup:
    return Markup(f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {W} {height}" '
                  f'width="{W}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
                  f"<title>{escape(title)}</title>{body}</svg>")


def progress_bars(rows: list[tuple[str, int, int]], title: str = "labelling progress") -> Markup:
    """One bar per row: (label, done, total)."""
    width = W - LEFT - 70
    parts = []
    for i, (label, done, total) in enumerate(rows):
        y = 8 + i * ROW
        frac = min(1.0, done / total) if total else 0.0
        parts.append(
            f'<text x="{LEFT - 8}" y="{y + 14}" text-anchor="end" font-size="12">{escape(label)}</text>'
            f'<rect x="{LEFT}" y="{y}" width="{width}" height="18" fill="#e5e7eb"/>'
            f'<rect x="{LEFT}" y="{y}" width="{frac * width:.1f}" height="18" fill="#2563eb"/>'
            f'<text x="{LEFT + width + 6}" y="{y + 14}" font-size="12">{done}/{total}</text>')
    return _svg(16 + ROW * max(1, len(rows)), "".join(parts), title)


def line_chart(points: list[tuple[str, float]], lo: float = -1.0, hi: float = 1.0,
               title: str = "agreement over time") -> Markup:
    """Labelled values in time order on a fixed [lo, hi] axis (the dashboard's agreement over time),
    drawn by ``alignloop.plots.line_chart`` with the first and last label under the x axis."""
    names = {1.0: points[0][0], float(len(points)): points[-1][0]} if points else None
    series = [plots.Series(title, [(float(i + 1), v) for i, (_, v) in enumerate(points)])]
    return Markup(plots.line_chart("agreement", title, series, "time", "Kendall's tau",
                                   x_names=names, y_range=(lo, hi)))


def interval_chart(rows: list[tuple[str, float, float, float]], title: str = "win rate (95% interval)") -> Markup:
    """One row per comparison: (label, estimate, low, high) on [0, 1], with the 0.5 line."""
    width = W - LEFT - 50
    if not rows:
        return _svg(40, '<text x="10" y="24" font-size="12">no votes yet</text>', title)

    def x(v: float) -> float:
        return LEFT + v * width

    parts = [f'<line x1="{x(0.5):.1f}" x2="{x(0.5):.1f}" y1="0" y2="{12 + ROW * max(1, len(rows))}" '
             'stroke="#9ca3af" stroke-dasharray="4 3"/>']
    for i, (label, p, lo, hi) in enumerate(rows):
        y = 18 + i * ROW
        parts.append(
            f'<text x="{LEFT - 8}" y="{y + 4}" text-anchor="end" font-size="12">{escape(label)}</text>'
            f'<line x1="{x(lo):.1f}" x2="{x(hi):.1f}" y1="{y}" y2="{y}" stroke="#2563eb" stroke-width="3"/>'
            f'<circle cx="{x(p):.1f}" cy="{y}" r="5" fill="#1e3a8a"/>'
            f'<text x="{x(1) + 6:.1f}" y="{y + 4}" font-size="12">{p:.2f}</text>')
    return _svg(16 + ROW * max(1, len(rows)), "".join(parts), title)
