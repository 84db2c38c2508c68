"""Smoke run of bench/ppo.py: it prints one BENCH_JSON line with samples/s, the time split and peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KEYS = {"samples_per_sec", "generate_s", "score_s", "reward_s", "score_other_s", "train_s", "peak_rss_mb",
        "timed_seconds", "samples"}



@pytest.mark.parametrize("algorithm", ["ppo", "rloo"])
def test_bench_prints_throughput_split_and_memory(peer_bench_fixtures, algorithm):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "ppo.py"), "--model", "tiny", "--fixtures",
                          str(peer_bench_fixtures), "--algorithm", algorithm, "--total-samples", "64", "--new-tokens", "4"],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, BENCH_OUT=""))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_JSON ")]
    assert len(lines) == 1
    res = json.loads(lines[0].removeprefix("BENCH_JSON "))
    assert KEYS <= res.keys()
    assert res["samples"] == 32 and res["samples_per_sec"] > 0 and res["peak_rss_mb"] > 0
    assert res["generate_s"] > 0 and res["score_s"] > 0 and res["train_s"] > 0
