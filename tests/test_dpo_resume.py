"""`alignloop dpo` killed with SIGKILL after a checkpoint and rerun ends exactly where an uninterrupted run
does (same metrics, timings aside; same eval.json; same weights), with the reference live and precomputed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignloop.models.tiny import build_tiny_model
from alignloop.runs import read_metrics
from conftest import repeat_task, write_jsonl

TESTS = Path(__file__).resolve().parent
STEPS = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dpo_resume")
    texts = [r["prompt"] + r["completion"] for r in repeat_task(200, seed=5)]
    policy = build_tiny_model(root / "policy", texts, vocab_size=300, hidden=32, layers=2, heads=2)
    rows = repeat_task(120, seed=6)
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"][::-1]} for r in rows]
    data = write_jsonl(root / "pairs.jsonl", pairs)
    config = root / "dpo.yaml"
    config.write_text(f"""\
model: {{name_or_path: {policy}}}
data: {{train: {data}}}
dpo: {{sft_weight: 0.1}}
train: {{lr: 0.001, batch_size: 4, grad_accum: 2, max_steps: {STEPS}, eval_steps: 10, save_steps: 4,
        log_steps: 2, report_to: []}}
""")
    return root, config


def cli(config: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "alignloop", "-q", "dpo", "-c", str(config), "--output", str(out),
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in rows]


@pytest.mark.slow(seconds=40)
@pytest.mark.parametrize("reference", ["live", "precompute"])
def test_sigkill_then_resume_matches_uninterrupted_run(setup, reference):
    root, config = setup
    full_dir, killed_dir = root / f"full-{reference}", root / f"killed-{reference}"
    extra = [f"dpo.reference={reference}"]
    full = cli(config, full_dir, *extra)
    killed = cli(config, killed_dir, *extra)
    latest = killed_dir / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert killed.poll() is None, killed.communicate()[1][-2000:]
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (killed_dir / "FINISHED").exists()
    resumed = cli(config, killed_dir, *extra)
    out_full, err_full = full.communicate(timeout=300)
    out_res, err_res = resumed.communicate(timeout=300)
    assert full.returncode == 0, err_full[-2000:]
    assert resumed.returncode == 0, err_res[-2000:]

    a, b = read_metrics(full_dir / "metrics.jsonl"), read_metrics(killed_dir / "metrics.jsonl")
    assert [r["step"] for r in b if "loss" in r] == list(range(2, STEPS + 1, 2))
    assert "reward_accuracy" in [r for r in b if "loss" in r][-1]
    assert comparable(a) == comparable(b)
    assert json.loads((full_dir / "eval.json").read_text()) == json.loads((killed_dir / "eval.json").read_text())
    weights = [(d / "model" / "model.safetensors").read_bytes() for d in (full_dir, killed_dir)]
    assert weights[0] == weights[1]
    assert (killed_dir / "reference").is_dir() == (reference == "precompute")
