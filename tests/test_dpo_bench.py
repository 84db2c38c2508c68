"""Smoke run of bench/dpo.py: it prints one BENCH_JSON line with pairs/s and peak memory, live and precomputed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]



@pytest.mark.parametrize("variant", [[], ["--precompute-ref"]])
def test_bench_prints_pairs_per_second_and_memory(peer_bench_fixtures, variant):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "dpo.py"), "--model", "tiny", "--fixtures",
                          str(peer_bench_fixtures), "--n-pairs", "48", *variant],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, BENCH_OUT=""))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_JSON ")]
    assert len(lines) == 1
    res = json.loads(lines[0].removeprefix("BENCH_JSON "))
    assert res["steps"] == 6 and res["timed_steps"] == 2 and res["pairs"] == 16
    assert res["pairs_per_sec"] > 0 and res["peak_rss_mb"] > 0
    assert res["variant"] == ("precompute_ref" if variant else "ref_model_each_step")
