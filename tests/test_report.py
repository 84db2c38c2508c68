"""The HTML report: every plot present and drawn from the run's files, model outputs escaped, missing
pieces shown as "no data", and the page renders in headless chromium (screenshot in test-artifacts/)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from alignloop.data import synthetic as S
from alignloop.evaluate.report import build_report, discover, overoptimisation_series
from alignloop.plots import nice_ticks
from alignloop.runs import read_metrics

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
PLOTS = {"pretrain-loss", "sft-loss", "rm-accuracy", "ppo-reward", "ppo-kl", "ppo-entropy", "gold-vs-rm", "win-rates",
         "benchmarks"}
PAYLOAD = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _benchmarks(acc: float) -> dict:
    return {"demo_world_choice": {"samples": 40, "metrics": {"acc": {"value": acc, "stderr": 0.05},
                                                             "acc_norm": {"value": acc / 2, "stderr": None}}},
            "demo_world_count": {"samples": 40, "metrics": {"exact_match,first-number": {"value": 0.1, "stderr": 0.02}}}}


def _eval(folder: Path, kl: float, gold_policy: float, gold_base: float, rm: float, win: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    wr = {"win_rate": win, "ci_low": win - 0.1, "ci_high": win + 0.1, "wins": 10, "ties": 0, "losses": 6, "n": 16}
    ev = {"prompts": 16, "models": {
        "policy": {"kl": {"mean": kl}, "reward_model": {"mean": rm}, "gold": {"total": {"mean": gold_policy}},
                   "length_tokens": {"mean": 30.0}, "safety": {"rate": 0.0}, "benchmarks": _benchmarks(gold_policy)},
        "baseline": {"reward_model": {"mean": 0.0}, "gold": {"total": {"mean": gold_base}},
                     "benchmarks": _benchmarks(gold_base)}},
        "win_rate": {"gold": wr, "reward_model": {**wr, "win_rate": win + 0.05}},
        "human_win_rates": [{"model_a": "policy", "model_b": "sft", "win_rate": 0.6, "ci_low": 0.4, "ci_high": 0.8}]}
    (folder / "eval.json").write_text(json.dumps(ev))
    prompts = [r["prompt"] for r in S.eval_prompts(3)]
    rows = [{"index": i, "prompt": p, "responses": {
        "policy": {"text": f"policy answer {i} {folder.parent.name}", "gold": {"total": gold_policy}, "reward_model": rm},
        "baseline": {"text": PAYLOAD if i == 0 else f"sft answer {i}", "gold": {"total": gold_base}}}}
        for i, p in enumerate(prompts)]
    _jsonl(folder / "samples.jsonl", rows)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A pipeline run folder as the stages write it: pretrain, SFT, two rounds of RM / PPO / eval."""
    root = tmp_path / "demo"
    _jsonl(root / "pretrain" / "metrics.jsonl", [{"step": s, "loss": 6 / s} for s in range(1, 30)])
    _jsonl(root / "sft" / "metrics.jsonl", [{"step": s, "loss": 2 - s / 50} for s in range(1, 40)] +
           [{"step": s, "eval_loss": 2.1 - s / 50} for s in (0, 20, 39)])
    prompt = S.rl_prompts(1)[0]["prompt"]
    for n, (kl, gold) in enumerate([(2.0, 0.75), (5.0, 0.8)], start=1):
        rnd = root / f"round-{n}"
        _jsonl(rnd / "rm" / "metrics.jsonl", [{"step": s, "eval_accuracy": 0.6 + s / 100} for s in (0, 10, 20)])
        (rnd / "rm" / "eval.json").write_text(json.dumps({"test": {"accuracy": 0.8 + n / 100}}))
        _jsonl(rnd / "ppo" / "metrics.jsonl", [{"step": s, "score_mean": s / 10, "kl": s / 5, "entropy": 2 - s / 20}
                                               for s in range(1, 11)])
        _jsonl(rnd / "ppo" / "samples.jsonl", [{"step": s, "prompt": prompt, "response": r, "score": s / 10, "kl": s / 5}
                                               for s in (1, 10) for r in S.candidate_responses(prompt, 2, seed=s)])
        _eval(rnd / "eval", kl, gold, 0.7, 0.5 * n, 0.6 + n / 20)
    # a broken line (crash mid-write) must not hide the rest
    with (root / "round-2" / "ppo" / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 11, "score_m')
    return root


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.plots: dict[str, dict] = {}
        self.current: str | None = None
        self.tables: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "svg" and "plot" in (a.get("class") or ""):
            self.current = a["data-plot"]
            self.plots[self.current] = {"empty": "empty" in a["class"], "lines": 0}
        elif tag == "polyline" and self.current:
            self.plots[self.current]["lines"] += 1
        elif tag == "table":
            self.tables.append(a.get("data-table") or a.get("class") or "")

    def handle_endtag(self, tag):
        if tag == "svg":
            self.current = None


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def test_every_plot_is_drawn_and_outputs_are_escaped(run_dir):
    out = build_report(run_dir, gold="alignloop.data.synthetic:gold_total")
    assert out == run_dir / "report.html"
    page = _parse(out)
    assert set(page.plots) == PLOTS
    assert not [p for p, v in page.plots.items() if v["empty"]]
    expected_lines = {"pretrain-loss": 1, "sft-loss": 2, "rm-accuracy": 2, "ppo-reward": 2, "ppo-kl": 2,
                      "ppo-entropy": 2, "gold-vs-rm": 4, "win-rates": 3, "benchmarks": 3}
    assert {p: v["lines"] for p, v in page.plots.items()} == expected_lines
    assert page.tables == ["summary", "benchmarks", "samples"]
    text = out.read_text()
    assert "<script" not in text and "<img" not in text and "script&gt;" in text
    assert "policy, round-1" in text and "policy, round-2" in text and "SFT model" in text
    assert "https://" not in text and "http://" not in text.replace("http://www.w3.org/2000/svg", "")


def test_gold_and_reward_against_kl_come_from_the_run(run_dir):
    from alignloop.data.synthetic import gold_total

    series = {s.name: s for s in overoptimisation_series(discover(run_dir), gold_total)}
    assert series["gold (eval)"].points == [(0.0, 0.7), (2.0, 0.75), (5.0, 0.8)]
    assert series["reward model (eval)"].points == [(0.0, 0.0), (2.0, 0.5), (5.0, 1.0)]
    samples = [s for r in (1, 2) for s in read_metrics(run_dir / f"round-{r}" / "ppo" / "samples.jsonl")]
    step10 = [s for s in samples if s["step"] == 10]
    gold_at_10 = sum(gold_total(s["prompt"], s["response"]) for s in step10) / len(step10)
    assert series["gold (PPO samples)"].points[-1] == pytest.approx((2.0, gold_at_10))
    assert series["gold (PPO samples)"].right and not series["reward model (PPO samples)"].right


def test_missing_pieces_say_no_data(tmp_path):
    empty = _parse(build_report(tmp_path))
    assert set(empty.plots) == PLOTS - {"pretrain-loss", "benchmarks"}
    assert all(v["empty"] for v in empty.plots.values())
    assert "no data" in (tmp_path / "report.html").read_text()
    _jsonl(tmp_path / "sft" / "metrics.jsonl", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
    partial = _parse(build_report(tmp_path))
    assert not partial.plots["sft-loss"]["empty"] and partial.plots["ppo-kl"]["empty"]


def test_benchmark_table_has_the_sft_model_then_each_rounds_policy(run_dir):
    text = build_report(run_dir).read_text()
    table = text.split('data-table="benchmarks"')[1].split("</table>")[0]
    head = re.findall(r"<th>(.*?)</th>", table)
    assert head == ["task", "metric", "SFT model", "policy, round-1", "policy, round-2"]
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in table.split("<tr>")[2:]]
    assert rows == [["demo_world_choice", "acc", "0.700 ± 0.050", "0.750 ± 0.050", "0.800 ± 0.050"],
                    ["demo_world_choice", "acc_norm", "0.350", "0.375", "0.400"],
                    ["demo_world_count", "exact_match,first-number", "0.100 ± 0.020", "0.100 ± 0.020",
                     "0.100 ± 0.020"]]


def test_nice_ticks_cover_the_range_with_round_steps():
    assert nice_ticks(0.0, 1.0) == [0.0, 0.25, 0.5, 0.75, 1.0]
    ticks = nice_ticks(0.37, 8.2)
    assert ticks[0] <= 0.37 and ticks[-1] >= 8.2 and ticks[1] - ticks[0] == 2
    assert len(nice_ticks(3.0, 3.0)) >= 2


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    out = build_report(run_dir, gold="alignloop.data.synthetic:gold_total")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--window-size=1280,3400"]
    url = out.resolve().as_uri()
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    page = _Page()
    page.feed(dom)
    assert set(page.plots) == PLOTS and not [p for p, v in page.plots.items() if v["empty"]]
    assert "samples" in page.tables
    assert "pwned" not in dom.split("</title>")[0] and "img" not in page.tags  # the payload stayed text
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    subprocess.run([_chromium(), *flags, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_report_command(run_dir, tmp_path, capsys):
    from alignloop.cli import main

    target = tmp_path / "out" / "r.html"
    assert main(["report", str(run_dir), "--output", str(target)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {target}"
    assert set(_parse(target).plots) == PLOTS
    assert main(["report", str(run_dir), "--gold", "no.such:fn"]) == 2
    assert "no.such:fn" in capsys.readouterr().err


def test_a_dpo_round_shows_its_curves_and_implicit_reward_accuracy(run_dir):
    """Round 2 as an online DPO round (collect -> label -> DPO -> eval): its loss, implicit-reward accuracy and
    margin curves, train and validation; the summary names the algorithm and the DPO test accuracy."""
    rnd = run_dir / "round-2"
    shutil.rmtree(rnd / "rm")
    shutil.rmtree(rnd / "ppo")
    train = [{"step": s, "loss": 0.69 - s / 100, "reward_accuracy": 0.5 + s / 50, "reward_margin": s / 20}
             for s in range(1, 11)]
    val = [{"step": s, "eval_loss": 0.7 - s / 120, "eval_reward_accuracy": 0.5 + s / 60, "eval_reward_margin": s / 30}
           for s in (0, 5, 10)]
    _jsonl(rnd / "dpo" / "metrics.jsonl", train + val)
    (rnd / "dpo" / "eval.json").write_text(json.dumps({"loss": "sigmoid", "test": {"reward_accuracy": 0.777}}))
    page = _parse(build_report(run_dir))
    lines = {p: v["lines"] for p, v in page.plots.items()}
    assert lines["dpo-loss"] == 2 and lines["dpo-reward-accuracy"] == 2 and lines["dpo-reward-margin"] == 2
    assert lines["rm-accuracy"] == 1 and lines["ppo-reward"] == 1  # only round 1 trained a reward model and PPO
    summary = re.search(r'<table class="summary">.*?</table>', (run_dir / "report.html").read_text(), re.S).group()
    rows = re.findall(r"<tr>(.*?)</tr>", summary)
    assert "<td>round-1</td><td>PPO</td><td>0.810</td>" in rows[1]
    assert "<td>round-2</td><td>DPO</td><td>0.777</td>" in rows[2]
