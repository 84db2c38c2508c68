"""A pipeline run as one self-contained HTML page: inline SVG plots and sample responses.

The page opens offline (no CDN, no scripts, no external files). It reads the run folders the
stages write, and says "no data" wherever a piece is missing:

    <run>/pretrain/metrics.jsonl                 base-model pretraining (the demo)
    <run>/sft/metrics.jsonl                      loss, eval_loss
    <run>/round-N/rm/metrics.jsonl, eval.json    eval_accuracy; test/validation accuracy
    <run>/round-N/ppo/metrics.jsonl              score_mean, kl, entropy; samples.jsonl
    <run>/round-N/eval/eval.json, samples.jsonl  alignloop eval

Everything that came from a model or a person is escaped before it reaches the page.
"""

from __future__ import annotations

import html
import json
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from alignloop.runs import atomic_write_text

PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
GoldFn = Callable[[str, str], "float | dict[str, float]"]


# ---------------------------------------------------------------- reading a run


@dataclass
class RoundInputs:
    name: str
    rm: Path | None = None
    ppo: Path | None = None
    eval: Path | None = None


@dataclass
class ReportInputs:
    title: str = "alignloop run"
    pretrain: Path | None = None
    sft: Path | None = None
    rounds: list[RoundInputs] = field(default_factory=list)


def _dir(path: Path) -> Path | None:
    return path if path.is_dir() else None


def discover(run_dir: str | Path) -> ReportInputs:
    """The stage folders of a pipeline run (rounds in numeric order: round-2 before round-10)."""
    root = Path(run_dir)
    rounds = []
    found = [p for p in root.glob("round-*") if p.is_dir()]
    for p in sorted(found, key=lambda p: (int(m.group()) if (m := re.search(r"\d+", p.name)) else 0, p.name)):
        rounds.append(RoundInputs(p.name, _dir(p / "rm"), _dir(p / "ppo"), _dir(p / "eval")))
    return ReportInputs(root.name, _dir(root / "pretrain"), _dir(root / "sft"), rounds)


def _json(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError):
        return {}


def _metrics(folder: Path | None) -> list[dict]:
    return _jsonl(folder / "metrics.jsonl" if folder else None)


def _jsonl(path: Path | None) -> list[dict]:
    if path is None or not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut off by a crash: skip it, keep the rest
    return rows


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def series_of(records: Sequence[dict], key: str, x: str = "step", offset: float = 0.0) -> list[tuple[float, float]]:
    return [(rec[x] + offset, rec[key]) for rec in records
            if _num(rec.get(key)) is not None and _num(rec.get(x)) is not None]


def _get(tree: dict, *path: str) -> float | None:
    for key in path:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return _num(tree)


# ---------------------------------------------------------------- SVG line charts


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


def line_chart(plot_id: str, title: str, series: Sequence[Series], xlabel: str, ylabel: str,
               y2label: str | None = None, x_names: dict[float, str] | None = None,
               hline: float | None = None, width: int = 560, height: int = 300) -> str:
    """An SVG line chart with axes, ticks, labels and a legend; "no data" when every series is empty."""
    series = [s for s in series if s.points]
    esc = html.escape

    def svg_open(h: int, css: str) -> str:
        return (f'<svg class="{css}" data-plot="{esc(plot_id)}" xmlns="http://www.w3.org/2000/svg" '
                f'width="{width}" height="{h}" viewBox="0 0 {width} {h}" role="img" '
                f'aria-label="{esc(title)}"><title>{esc(title)}</title>'
                f'<text x="{width / 2}" y="18" class="title">{esc(title)}</text>')

    if not series:
        return svg_open(height, "plot empty") + f'<text x="{width / 2}" y="{height / 2}" class="nodata">no data</text></svg>'
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
    axes = {False: bounds([s for s in series if not s.right] or series)}
    if any(s.right for s in series):
        axes[True] = bounds([s for s in series if s.right])

    def px(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1) * pw

    def py(y: float, right_axis: bool) -> float:
        t = axes[right_axis]
        return top + ph - (y - t[0]) / ((t[-1] - t[0]) or 1) * ph

    out = [svg_open(height + 16 * (legend_rows - 1), "plot"), f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>']
    for x in xt:
        label = x_names[x] if x_names else _fmt(x)
        out.append(f'<line x1="{px(x):.1f}" y1="{top + ph}" x2="{px(x):.1f}" y2="{top + ph + 4}" class="axis"/>'
                   f'<text x="{px(x):.1f}" y="{top + ph + 16}" class="tick">{esc(label)}</text>')
    for right_axis, ticks in axes.items():
        anchor, xpos = ("start", left + pw + 6) if right_axis else ("end", left - 6)
        for y in ticks:
            out.append(f'<text x="{xpos}" y="{py(y, right_axis) + 4:.1f}" class="tick" text-anchor="{anchor}">'
                       f'{_fmt(y)}</text>')
            if not right_axis:
                out.append(f'<line x1="{left}" y1="{py(y, False):.1f}" x2="{left + pw}" y2="{py(y, False):.1f}" '
                           'class="grid"/>')
    out.append(f'<text x="{left + pw / 2}" y="{top + ph + 34}" class="label">{esc(xlabel)}</text>')
    out.append(f'<text transform="translate(14 {top + ph / 2}) rotate(-90)" class="label">{esc(ylabel)}</text>')
    if y2label and True in axes:
        out.append(f'<text transform="translate({width - 10} {top + ph / 2}) rotate(90)" class="label">'
                   f'{esc(y2label)}</text>')
    if hline is not None:
        out.append(f'<line x1="{left}" y1="{py(hline, False):.1f}" x2="{left + pw}" y2="{py(hline, False):.1f}" '
                   'class="hline"/>')
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
                   f'stroke="{colour}" stroke-width="3"{dash}/>'
                   f'<text x="{legend_x + 18}" y="{legend_y}" class="legend">{esc(name)}</text>')
        legend_x += item_width
    out.append("</svg>")
    return "".join(out)


# ---------------------------------------------------------------- the plots of a run


def _round_offsets(rounds: Sequence[RoundInputs], metrics: dict[str, list[dict]]) -> dict[str, float]:
    """PPO steps restart every round; offset each round so the x axis reads as one continuing run."""
    offsets, total = {}, 0.0
    for rnd in rounds:
        offsets[rnd.name] = total
        steps = [r["step"] for r in metrics[rnd.name] if _num(r.get("step")) is not None]
        total += max(steps, default=0)
    return offsets


def _ppo_score_key(records: Sequence[dict]) -> str:
    for key in ("score_mean", "reward", "reward_total"):
        if any(_num(r.get(key)) is not None for r in records):
            return key
    return "score_mean"


def gold_value(gold: GoldFn, prompt: str, response: str) -> float:
    """A gold function's overall score: the number itself, or a dict's "total" (else its mean)."""
    value = gold(prompt, response)
    if isinstance(value, dict):
        return float(value["total"]) if "total" in value else statistics.fmean(value.values())
    return float(value)


def _sample_points(samples: list[dict], gold: GoldFn | None) -> list[tuple[float, float, float | None]]:
    """Per logged PPO step: (mean KL, mean reward-model score, mean gold) of its samples."""
    by_step: dict[float, list[dict]] = {}
    for s in samples:
        if _num(s.get("step")) is not None and _num(s.get("kl")) is not None and _num(s.get("score")) is not None:
            by_step.setdefault(s["step"], []).append(s)
    points = []
    for step in sorted(by_step):
        rows = by_step[step]
        g = statistics.fmean(gold_value(gold, r["prompt"], r["response"]) for r in rows) if gold else None
        points.append((statistics.fmean(r["kl"] for r in rows), statistics.fmean(r["score"] for r in rows), g))
    return points


def _gold_total(ev: dict, model: str) -> float | None:
    return _get(ev, "models", model, "gold", "total", "mean")


def overoptimisation_series(inputs: ReportInputs, gold: GoldFn | None) -> list[Series]:
    """Gold and reward-model scores against KL from the SFT model: from each round's evaluation (the
    SFT model at KL 0) and, with a gold function, from the PPO samples along the way."""
    rm_pts: list[tuple[float, float]] = []
    gold_pts: list[tuple[float, float]] = []
    for rnd in inputs.rounds:
        ev = _json(rnd.eval / "eval.json" if rnd.eval else None)
        if not ev:
            continue
        kl = _get(ev, "models", "policy", "kl", "mean")
        if not rm_pts and not gold_pts:  # the baseline (SFT) sits at KL 0
            for pts, value in ((rm_pts, _get(ev, "models", "baseline", "reward_model", "mean")),
                               (gold_pts, _gold_total(ev, "baseline"))):
                if value is not None:
                    pts.append((0.0, value))
        if kl is None:
            continue
        for pts, value in ((rm_pts, _get(ev, "models", "policy", "reward_model", "mean")),
                           (gold_pts, _gold_total(ev, "policy"))):
            if value is not None:
                pts.append((kl, value))
    out = [Series("reward model (eval)", rm_pts), Series("gold (eval)", gold_pts, right=True)]
    ppo_samples = [s for rnd in inputs.rounds for s in _jsonl(rnd.ppo / "samples.jsonl" if rnd.ppo else None)]
    sample_pts = _sample_points(ppo_samples, gold)
    if sample_pts:
        out.append(Series("reward model (PPO samples)", [(k, r) for k, r, _ in sample_pts], dashed=True))
        if gold:
            out.append(Series("gold (PPO samples)", [(k, g) for k, _, g in sample_pts], right=True, dashed=True))
    return out


def win_rate_series(inputs: ReportInputs) -> tuple[list[Series], dict[float, str]]:
    names: dict[float, str] = {}
    by_judge: dict[str, tuple[list, list]] = {}
    for i, rnd in enumerate(inputs.rounds):
        ev = _json(rnd.eval / "eval.json" if rnd.eval else None)
        names[float(i + 1)] = rnd.name
        judged = dict(ev.get("win_rate", {}))
        for row in ev.get("human_win_rates", []) or []:
            judged.setdefault(f"people ({row.get('model_a')} vs {row.get('model_b')})", row)
        for judge, wr in judged.items():
            if _num(wr.get("win_rate")) is None:
                continue
            pts, errs = by_judge.setdefault(judge.replace("_", " "), ([], []))
            pts.append((float(i + 1), wr["win_rate"]))
            errs.append((wr.get("ci_low", wr["win_rate"]), wr.get("ci_high", wr["win_rate"])))
    return [Series(j, p, errors=e) for j, (p, e) in by_judge.items()], names


def plots(inputs: ReportInputs, gold: GoldFn | None) -> list[tuple[str, str]]:
    """(section heading, SVG) for every plot of the report, in reading order."""
    out = []
    if inputs.pretrain:
        pre = _metrics(inputs.pretrain)
        out.append(("Base model pretraining", line_chart(
            "pretrain-loss", "Pretraining loss", [Series("train", series_of(pre, "loss")),
                                                  Series("validation", series_of(pre, "eval_loss"))],
            "step", "loss")))
    sft = _metrics(inputs.sft)
    out.append(("Supervised fine-tuning", line_chart(
        "sft-loss", "SFT loss", [Series("train", series_of(sft, "loss")),
                                 Series("validation", series_of(sft, "eval_loss"))], "step", "loss")))
    rm_series = [Series(rnd.name, series_of(_metrics(rnd.rm), "eval_accuracy")) for rnd in inputs.rounds]
    out.append(("Reward model", line_chart("rm-accuracy", "Reward-model validation accuracy", rm_series,
                                           "step", "pairwise accuracy", hline=0.5)))
    ppo = {rnd.name: _metrics(rnd.ppo) for rnd in inputs.rounds}
    offsets = _round_offsets(inputs.rounds, ppo)
    for key, title, ylabel in ((None, "PPO reward-model score", "score"), ("kl", "PPO KL to the reference", "KL"),
                               ("entropy", "PPO policy entropy", "entropy (nats / token)")):
        series = [Series(name, series_of(recs, key or _ppo_score_key(recs), offset=offsets[name]))
                  for name, recs in ppo.items()]
        out.append(("PPO", line_chart(f"ppo-{key or 'reward'}", title, series, "PPO step (all rounds)", ylabel)))
    out.append(("Reward over-optimisation", line_chart(
        "gold-vs-rm", "Gold score and reward-model score as KL grows", overoptimisation_series(inputs, gold),
        "KL(policy || SFT model), nats per response", "reward-model score", y2label="gold score")))
    series, names = win_rate_series(inputs)
    out.append(("Win rates", line_chart("win-rates", "Win rate of each round's policy over the SFT model (95% CI)",
                                        series, "round", "win rate", x_names=names, hline=0.5)))
    return out


# ---------------------------------------------------------------- tables


def _cell(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def summary_table(inputs: ReportInputs) -> str:
    esc = html.escape
    head = ["round", "RM test acc.", "policy gold", "SFT gold", "policy RM score", "KL", "win rate (gold)",
            "win rate (RM)", "length (tokens)", "unsafe"]
    rows = []
    for rnd in inputs.rounds:
        rm_eval = _json(rnd.rm / "eval.json" if rnd.rm else None)
        ev = _json(rnd.eval / "eval.json" if rnd.eval else None)
        acc = _get(rm_eval, "test", "accuracy") or _get(rm_eval, "validation", "accuracy")

        def wr(judge: str, ev=ev) -> str:
            w = ev.get("win_rate", {}).get(judge)
            if not w:
                return "–"
            return f"{w['win_rate']:.2f} [{w['ci_low']:.2f}, {w['ci_high']:.2f}]"

        cells = [esc(rnd.name), _cell(acc), _cell(_gold_total(ev, "policy")), _cell(_gold_total(ev, "baseline")),
                 _cell(_get(ev, "models", "policy", "reward_model", "mean")),
                 _cell(_get(ev, "models", "policy", "kl", "mean")), wr("gold"), wr("reward_model"),
                 _cell(_get(ev, "models", "policy", "length_tokens", "mean"), 1),
                 _cell(_get(ev, "models", "policy", "safety", "rate"), 3)]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    if not rows:
        return '<p class="nodata">no data</p>'
    return ('<table class="summary"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in prompt if isinstance(m, dict))
    return str(prompt)


def sample_table(inputs: ReportInputs, limit: int = 8) -> str:
    """The same prompts answered by the SFT model and by every round's policy, side by side."""
    esc = html.escape
    columns: dict[str, dict[str, dict]] = {}  # model column -> prompt -> response record
    order: list[str] = []
    for rnd in inputs.rounds:
        for row in _jsonl(rnd.eval / "samples.jsonl" if rnd.eval else None):
            prompt = _prompt_text(row.get("prompt"))
            responses = row.get("responses") or {}
            if not isinstance(responses, dict):
                continue
            if prompt not in order:
                order.append(prompt)
            if isinstance(responses.get("baseline"), dict):
                columns.setdefault("SFT model", {}).setdefault(prompt, responses["baseline"])
            if isinstance(responses.get("policy"), dict):
                columns.setdefault(f"policy, {rnd.name}", {})[prompt] = responses["policy"]
    if not order:
        return '<p class="nodata" data-table="samples">no data</p>'

    def cell(resp: dict | None) -> str:
        if resp is None:
            return "<td>–</td>"
        scores = []
        gold = resp.get("gold")
        gold = gold.get("total") if isinstance(gold, dict) else gold
        if _num(gold) is not None:
            scores.append(f"gold {gold:.2f}")
        if _num(resp.get("reward_model")) is not None:
            scores.append(f"RM {resp['reward_model']:.2f}")
        if resp.get("flagged"):
            scores.append("flagged unsafe")
        meta = f'<div class="scores">{esc(" · ".join(scores))}</div>' if scores else ""
        return f'<td><div class="response">{esc(str(resp.get("text", "")))}</div>{meta}</td>'

    head = "<th>prompt</th>" + "".join(f"<th>{esc(name)}</th>" for name in columns)
    body = "".join(f"<tr><td class=\"prompt\">{esc(p)}</td>" + "".join(cell(col.get(p)) for col in columns.values())
                   + "</tr>" for p in order[:limit])
    return f'<table class="samples" data-table="samples"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


# ---------------------------------------------------------------- the page


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1220px;color:#222;
padding:0 16px}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:4px}
.plots{display:flex;flex-wrap:wrap;gap:16px}
svg.plot{background:#fff;border:1px solid #e2e2e2;border-radius:4px}
svg .title{font-size:13px;font-weight:600;text-anchor:middle}
svg .tick{font-size:10px;fill:#555;text-anchor:middle}
svg .label{font-size:11px;fill:#333;text-anchor:middle}
svg .legend{font-size:11px;fill:#333}
svg .nodata{font-size:14px;fill:#999;text-anchor:middle}
svg .frame{fill:none;stroke:#bbb}svg .grid{stroke:#eee}svg .axis{stroke:#888}
svg .hline{stroke:#999;stroke-dasharray:4 3}
table{border-collapse:collapse;font-size:13px;margin-top:8px}
th,td{border:1px solid #ddd;padding:6px 8px;vertical-align:top;text-align:left}
th{background:#f5f5f5}
table.samples td{max-width:320px;white-space:pre-wrap;word-wrap:break-word}
td.prompt{font-weight:600}.scores{color:#666;font-size:11px;margin-top:4px}
.nodata{color:#999}.meta{color:#666;font-size:12px}
"""


def render_html(inputs: ReportInputs, gold: GoldFn | None = None) -> str:
    esc = html.escape
    sections: dict[str, list[str]] = {}
    for heading, svg in plots(inputs, gold):
        sections.setdefault(heading, []).append(svg)
    body = [f"<h1>{esc(inputs.title)}</h1>",
            f'<p class="meta">generated {esc(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))} · '
            f'{len(inputs.rounds)} round(s)</p>',
            "<h2>Summary</h2>", summary_table(inputs)]
    for heading, svgs in sections.items():
        body.append(f"<h2>{esc(heading)}</h2><div class=\"plots\">{''.join(svgs)}</div>")
    body += ["<h2>Example responses</h2>", sample_table(inputs)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
            f"<title>{esc(inputs.title)}</title><style>{CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")


def build_report(run: str | Path | ReportInputs, output: str | Path | None = None, gold: str | GoldFn | None = None,
                 title: str | None = None) -> Path:
    """Write the HTML report of a pipeline run folder (or of explicit ``ReportInputs``) and return its path.

    ``gold`` ("package.module:function" or a callable (prompt, response) -> float) scores the PPO
    samples, which puts gold next to the reward-model score along the whole PPO run.
    """
    inputs = run if isinstance(run, ReportInputs) else discover(run)
    if title:
        inputs.title = title
    if isinstance(gold, str):
        from alignloop.rl.rewards import import_callable

        gold = import_callable(gold)
    if output is None:
        if isinstance(run, ReportInputs):
            raise ValueError("output is required with explicit ReportInputs")
        output = Path(run) / "report.html"
    output = Path(output)
    atomic_write_text(output, render_html(inputs, gold))
    return output
