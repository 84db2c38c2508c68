"""Small inline SVG charts drawn on the server (no JavaScript, no chart library in the browser).

All text that reaches the SVG (round names, model names, usernames) is escaped here.
"""

from __future__ import annotations

from markupsafe import Markup, escape

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
    """Values in [lo, hi] in order, with the first and last x label."""
    height, top, bottom, left, right = 200, 12, 170, 44, W - 12
    if not points:
        return _svg(40, '<text x="10" y="24" font-size="12">no data yet</text>', title)

    def y(v: float) -> float:
        return bottom - (v - lo) / (hi - lo) * (bottom - top)

    step = (right - left) / max(1, len(points) - 1)
    xy = [(left + i * step, y(v)) for i, (_, v) in enumerate(points)]
    path = " ".join(f"{x:.1f},{yy:.1f}" for x, yy in xy)
    grid = "".join(f'<line x1="{left}" x2="{right}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#e5e7eb"/>'
                   f'<text x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end" font-size="11">{t:g}</text>'
                   for t in (lo, (lo + hi) / 2, hi))
    dots = "".join(f'<circle cx="{x:.1f}" cy="{yy:.1f}" r="3" fill="#2563eb"><title>{escape(lbl)}: {v:.3f}'
                   f"</title></circle>" for (x, yy), (lbl, v) in zip(xy, points, strict=True))
    labels = (f'<text x="{left}" y="{height - 10}" font-size="11">{escape(points[0][0])}</text>'
              f'<text x="{right}" y="{height - 10}" text-anchor="end" font-size="11">{escape(points[-1][0])}</text>')
    body = grid + f'<polyline points="{path}" fill="none" stroke="#2563eb" stroke-width="2"/>' + dots + labels
    return _svg(height, body, title)


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
