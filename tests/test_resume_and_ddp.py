"""Exact resume after SIGKILL, and two processes training to the same weights as one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from alignloop.runs import read_metrics

DETERMINISTIC_KEYS = ("loss", "eval_loss", "lr", "grad_norm")


def alignloop(*args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "alignloop", "-q", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def sft_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["sft", "--model", str(model), "--data", str(data), "--output", str(out), "train.lr=3e-3",
            "train.batch_size=8", "train.log_steps=2", "train.report_to=[]", "data.max_seq_len=64", *extra]


def comparable(metrics: list[dict]) -> list[dict]:
    return [{k: m[k] for k in ("step", *DETERMINISTIC_KEYS) if k in m} for m in metrics]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_model, sft_data, tmp_path):
    args = ("train.max_steps=40", "train.save_steps=4", "train.eval_steps=10", "model.dropout=0.1")
    full = alignloop(*sft_args(tiny_model, sft_data, tmp_path / "full", *args))
    assert full.wait(timeout=300) == 0, full.stdout.read()

    killed_dir = tmp_path / "killed"
    proc = alignloop(*sft_args(tiny_model, sft_data, killed_dir, *args))
    deadline = time.time() + 300
    while not (killed_dir / "checkpoints" / "latest").exists():
        assert proc.poll() is None, "run ended before a checkpoint appeared"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (killed_dir / "FINISHED").exists()
    killed_at = len(read_metrics(killed_dir / "metrics.jsonl"))

    resumed = alignloop(*sft_args(tiny_model, sft_data, killed_dir, *args))
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    assert (killed_dir / "FINISHED").exists()

    a, b = weights(tmp_path / "full"), weights(killed_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full_metrics = comparable(read_metrics(tmp_path / "full" / "metrics.jsonl"))
    assert comparable(read_metrics(killed_dir / "metrics.jsonl")) == full_metrics
    assert killed_at < len(full_metrics)  # the kill really happened mid-run


def test_two_processes_match_one_process_with_double_accumulation(tiny_model, sft_data, tmp_path):
    common = ("train.max_steps=6", "train.group_by_length=false")
    single = alignloop(*sft_args(tiny_model, sft_data, tmp_path / "one", *common, "train.grad_accum=2"))
    assert single.wait(timeout=300) == 0, single.stdout.read()
    ddp = alignloop(*sft_args(tiny_model, sft_data, tmp_path / "two", *common), "--nproc", "2")
    assert ddp.wait(timeout=300) == 0, ddp.stdout.read()
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    base = load_file(str(tiny_model / "model.safetensors"))
    moved = max((a[k] - base[k]).abs().max().item() for k in base)
    apart = max((a[k] - b[k]).abs().max().item() for k in a)
    # Float tolerance: reduction order differs between gloo all-reduce and local accumulation, and
    # Adam divides by sqrt(v), which magnifies rounding on near-zero gradients.
    # (measured: ~2e-6 apart after moving ~1e-2)
    assert moved > 1e-3
    assert apart < 1e-4, (apart, moved)
    la = [m["loss"] for m in read_metrics(tmp_path / "one" / "metrics.jsonl") if "loss" in m]
    lb = [m["loss"] for m in read_metrics(tmp_path / "two" / "metrics.jsonl") if "loss" in m]
    assert la == __import__("pytest").approx(lb, rel=1e-5)
