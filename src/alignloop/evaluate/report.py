"""A pipeline run as one self-contained HTML page: inline SVG plots and sample responses.

The page opens offline (no CDN, no scripts, no external files). It reads the run folders the
stages write, and says "no data" wherever a piece is missing:

    <run>/pretrain/metrics.jsonl                 base-model pretraining (the demo)
    <run>/sft/metrics.jsonl                      loss, eval_loss
    <run>/round-N/rm/metrics.jsonl, eval.json    eval_accuracy; test/validation accuracy
    <run>/round-N/ppo/metrics.jsonl              score_mean, kl, entropy; samples.jsonl
    <run>/round-N/dpo/metrics.jsonl, eval.json   a DPO round (instead of rm + ppo): loss, implicit-reward
                                                 accuracy and margin; held-out and gold-ordered test pairs
    <run>/round-N/eval/eval.json, samples.jsonl  alignloop eval (with --benchmarks: lm-eval scores)

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

from alignloop.data.formats import chat_as_lines
from alignloop.plots import Series, line_chart
from alignloop.runs import atomic_write_text, read_metrics

GoldFn = Callable[[str, str], "float | dict[str, float]"]


# ---------------------------------------------------------------- reading a run


@dataclass
class RoundInputs:
    name: str
    rm: Path | None = None
    ppo: Path | None = None
    eval: Path | None = None
    dpo: Path | None = None


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
        rounds.append(RoundInputs(p.name, _dir(p / "rm"), _dir(p / "ppo"), _dir(p / "eval"), _dir(p / "dpo")))
    return ReportInputs(root.name, _dir(root / "pretrain"), _dir(root / "sft"), rounds)


def _json(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError):
        return {}


def _metrics(folder: Path | None) -> list[dict]:
    return read_metrics(folder / "metrics.jsonl") if folder else []


def _samples(folder: Path | None) -> list[dict]:
    return read_metrics(folder / "samples.jsonl") if folder else []


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
    ppo_samples = [s for rnd in inputs.rounds for s in _samples(rnd.ppo)]
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


def dpo_plots(rounds: Sequence[RoundInputs]) -> list[tuple[str, str]]:
    """A DPO round's curves (steps restart each round, as in its own metrics.jsonl): the objective, and how
    often and by how much the implicit reward beta * log(pi / pi_ref) puts the chosen response first."""
    if not rounds:
        return []
    metrics = {rnd.name: _metrics(rnd.dpo) for rnd in rounds}
    loss = [Series(f"{name} {label}", series_of(recs, key), dashed=label == "validation")
            for name, recs in metrics.items() for label, key in (("train", "loss"), ("validation", "eval_loss"))]
    out = [("Direct preference optimisation", line_chart("dpo-loss", "DPO loss", loss, "step (per round)", "loss"))]
    for key, title, ylabel, hline in (
            ("reward_accuracy", "DPO implicit-reward accuracy (chosen above rejected)", "accuracy", 0.5),
            ("reward_margin", "DPO implicit-reward margin, chosen minus rejected", "margin", 0.0)):
        series = [Series(f"{name} {label}", series_of(recs, prefix + key), dashed=label == "validation")
                  for name, recs in metrics.items() for label, prefix in (("train", ""), ("validation", "eval_"))]
        out.append(("Direct preference optimisation", line_chart(f"dpo-{key.replace('_', '-')}", title, series,
                                                                  "step (per round)", ylabel, hline=hline)))
    return out


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
    rm_series = [Series(rnd.name, series_of(_metrics(rnd.rm), "eval_accuracy")) for rnd in inputs.rounds if rnd.rm]
    if rm_series or not any(rnd.dpo for rnd in inputs.rounds):
        out.append(("Reward model", line_chart("rm-accuracy", "Reward-model validation accuracy", rm_series,
                                               "step", "pairwise accuracy", hline=0.5)))
    out += dpo_plots([rnd for rnd in inputs.rounds if rnd.dpo])
    ppo_rounds = [rnd for rnd in inputs.rounds if not rnd.dpo]
    ppo = {rnd.name: _metrics(rnd.ppo) for rnd in ppo_rounds}
    offsets = _round_offsets(ppo_rounds, ppo)
    for key, title, ylabel in ((None, "PPO reward-model score", "score"), ("kl", "PPO KL to the reference", "KL"),
                               ("entropy", "PPO policy entropy", "entropy (nats / token)")):
        if ppo_rounds or not inputs.rounds:
            series = [Series(name, series_of(recs, key or _ppo_score_key(recs), offset=offsets[name]))
                      for name, recs in ppo.items()]
            out.append(("PPO", line_chart(f"ppo-{key or 'reward'}", title, series, "PPO step (all rounds)",
                                          ylabel)))
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
    head = ["round", "algorithm", "pref. test acc. (RM / DPO)", "policy gold", "SFT gold", "policy RM score", "KL",
            "win rate (gold)", "win rate (RM)", "length (tokens)", "unsafe"]
    rows = []
    for rnd in inputs.rounds:
        rm_eval = _json(rnd.rm / "eval.json" if rnd.rm else None)
        ev = _json(rnd.eval / "eval.json" if rnd.eval else None)
        acc = _get(rm_eval, "test", "accuracy") or _get(rm_eval, "validation", "accuracy")
        if rnd.dpo:  # no reward model: the implicit reward's accuracy on the same kind of held-out pairs
            dpo_eval = _json(rnd.dpo / "eval.json")
            acc = _get(dpo_eval, "test", "reward_accuracy") or _get(dpo_eval, "validation", "reward_accuracy")

        def wr(judge: str, ev=ev) -> str:
            w = ev.get("win_rate", {}).get(judge)
            if not w:
                return "–"
            n = f" (n={w['n']})" if "n" in w else ""  # the prompts it was measured on
            return f"{w['win_rate']:.2f} [{w['ci_low']:.2f}, {w['ci_high']:.2f}]{n}"

        cells = [esc(rnd.name), "DPO" if rnd.dpo else "PPO" if rnd.ppo else "–", _cell(acc), _cell(_gold_total(ev, "policy")), _cell(_gold_total(ev, "baseline")),
                 _cell(_get(ev, "models", "policy", "reward_model", "mean")),
                 _cell(_get(ev, "models", "policy", "kl", "mean")), wr("gold"), wr("reward_model"),
                 _cell(_get(ev, "models", "policy", "length_tokens", "mean"), 1),
                 _cell(_get(ev, "models", "policy", "safety", "rate"), 3)]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    if not rows:
        return '<p class="nodata">no data</p>'
    return ('<table class="summary"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def benchmark_columns(inputs: ReportInputs) -> dict[str, dict]:
    """Model column -> its benchmark scores (eval.json's models.<name>.benchmarks): the SFT model (the
    first round's baseline that has them), then each round's policy."""
    columns: dict[str, dict] = {}
    for rnd in inputs.rounds:
        models = _json(rnd.eval / "eval.json" if rnd.eval else None).get("models", {})
        for name, column in (("baseline", "SFT model"), ("policy", f"policy, {rnd.name}")):
            scores = models.get(name, {}).get("benchmarks") if isinstance(models.get(name), dict) else None
            if isinstance(scores, dict) and scores:
                columns.setdefault(column, scores)
    return columns


def benchmark_rows(columns: dict[str, dict]) -> list[tuple[str, str]]:
    """Every (task, metric) any column has, in the order they first appear."""
    rows: dict[tuple[str, str], None] = {}
    for scores in columns.values():
        for task, score in scores.items():
            for metric in (score.get("metrics") or {}) if isinstance(score, dict) else {}:
                rows[(task, metric)] = None
    return list(rows)


def _benchmark_value(scores: dict, task: str, metric: str) -> tuple[float | None, float | None]:
    entry = (scores.get(task) or {}).get("metrics", {}).get(metric) or {}
    return _num(entry.get("value")), _num(entry.get("stderr"))


def benchmark_chart(columns: dict[str, dict]) -> str:
    """One line per (task, metric) across the models, whiskers at one standard error."""
    names = {float(i): name for i, name in enumerate(columns)}
    series = []
    for task, metric in benchmark_rows(columns):
        points, errors = [], []
        for i, scores in enumerate(columns.values()):
            value, stderr = _benchmark_value(scores, task, metric)
            if value is not None:
                points.append((float(i), value))
                errors.append((value - (stderr or 0.0), value + (stderr or 0.0)))
        series.append(Series(f"{task} {metric}", points, errors=errors))
    return line_chart("benchmarks", "Benchmark scores (lm-evaluation-harness, ±1 standard error)", series, "model",
                      "score", x_names=names)


def benchmark_table(columns: dict[str, dict]) -> str:
    esc = html.escape

    def cell(scores: dict, task: str, metric: str) -> str:
        value, stderr = _benchmark_value(scores, task, metric)
        if value is None:
            return "<td>–</td>"
        return f"<td>{value:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "") + "</td>"

    head = "<th>task</th><th>metric</th>" + "".join(f"<th>{esc(name)}</th>" for name in columns)
    body = "".join(f"<tr><td>{esc(task)}</td><td>{esc(metric)}</td>"
                   + "".join(cell(scores, task, metric) for scores in columns.values()) + "</tr>"
                   for task, metric in benchmark_rows(columns))
    return (f'<table class="benchmarks" data-table="benchmarks"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return chat_as_lines([m for m in prompt if isinstance(m, dict)])
    return str(prompt)


def sample_table(inputs: ReportInputs, limit: int = 8) -> str:
    """The same prompts answered by the SFT model and by every round's policy, side by side."""
    esc = html.escape
    columns: dict[str, dict[str, dict]] = {}  # model column -> prompt -> response record
    order: list[str] = []
    for rnd in inputs.rounds:
        for row in _samples(rnd.eval):
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
    columns = benchmark_columns(inputs)
    if columns:  # only runs evaluated with --benchmarks have them
        body.append(f'<h2>Benchmarks</h2><div class="plots">{benchmark_chart(columns)}</div>'
                    + benchmark_table(columns))
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
        # rl.rewards loads torch; the report itself needs neither, so only a gold function given by name pays for it.
        from alignloop.rl.rewards import import_callable

        gold = import_callable(gold)
    if output is None:
        if isinstance(run, ReportInputs):
            raise ValueError("output is required with explicit ReportInputs")
        output = Path(run) / "report.html"
    output = Path(output)
    atomic_write_text(output, render_html(inputs, gold))
    return output
