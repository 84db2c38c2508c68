"""alignloop reward-model training throughput on CPU: preference pairs/second, steady state.

    python bench/reward.py --model tiny --fixtures /tmp/peer-bench/fixtures
    python bench/reward.py --model 25m --fixtures /tmp/peer-bench/fixtures --max-steps 16
    python bench/reward.py --model tiny --fixtures /tmp/peer-bench/fixtures --peer-python ../peer-venv/bin/python

Same workload as the peer's trl_reward.py: synth.preference_pairs(256), the fixture causal LM as a
sequence classifier with one new seeded score head, batch 8 pairs (16 sequences in one forward),
1 epoch (32 steps), Bradley-Terry loss, AdamW lr 1e-5 constant, fp32, 2 threads. It runs the real
``alignloop rm`` stage (run_rm) and times its loop from the end of step 3: a step ends when the
next one starts collating, so the window covers collation, forward, backward, clipping, the
optimizer and all per-step bookkeeping; the last step (which also writes the final checkpoint) and
everything after the loop are left out. ``--fixtures`` is the folder make_fixtures.py wrote; the
peer's synth.py and common.py are imported from the folder above it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import peer  # noqa: I001  (bench/ itself is on sys.path when a script here runs)
from fit_timing import FitTimer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["tiny", "25m"], default="tiny")
    ap.add_argument("--fixtures", required=True, help="fixtures/ folder written by the peer's make_fixtures.py")
    ap.add_argument("--n-pairs", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-steps", type=int, default=None, help="default: one full epoch")
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--no-group-by-length", action="store_true", help="batches in plain shuffled order")
    peer.add_arguments(ap)
    a = ap.parse_args()

    fixtures = Path(a.fixtures).resolve()
    model_dir = fixtures / {"tiny": "llama-tiny", "25m": "llama-25m"}[a.model]
    if not (model_dir / "config.json").exists():
        sys.exit(f"missing fixture {model_dir}: run make_fixtures.py in the peer-bench folder first")
    sys.path.insert(0, str(peer.peer_folder(fixtures)))
    import common  # noqa: I001  (sets thread and offline environment variables before torch loads)
    import synth

    common.setup_torch()  # 2 threads; seeds the new score head like the peer script
    common.quiet_logs()
    import alignloop.train.reward as stage
    from alignloop.config import RMConfig, build_config

    work = Path(tempfile.mkdtemp(prefix="alignloop-bench-rm-"))
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in synth.preference_pairs(a.n_pairs)))
    overrides = ["train.lr=1e-5", "train.schedule=constant", "train.warmup_steps=0", "train.weight_decay=0",
                 f"train.batch_size={a.batch_size}", "train.epochs=1", *peer.training_overrides(a),
                 "train.report_to=[]", "train.log_steps=1000000", "train.seed=42", "model.dtype=float32",
                 "data.split.validation=0", "data.split.test=0", "data.max_seq_len=1024",
                 f"train.group_by_length={not a.no_group_by_length}", "normalization_samples=2"]
    if a.max_steps:
        overrides.append(f"train.max_steps={a.max_steps}")
    cfg = build_config(RMConfig, None, {"model.name_or_path": str(model_dir), "data.train": str(data),
                                        "output_dir": str(work / "run")}, overrides)

    timer = FitTimer(stage, lambda b: {"pairs": int(len(b["win"])), "tokens": int(b["tokens"]),
                                      "padded_tokens": int(b["input_ids"].numel())}, common)
    t0 = time.perf_counter()
    stage.run_rm(cfg, overwrite=True)
    total = time.perf_counter() - t0
    shutil.rmtree(work)

    window = timer.steady_state(a.warmup_steps, common)
    ours = {
        "bench": "alignloop_reward",
        "model": a.model,
        "params": int(timer.params),
        "variant": "grouped_by_length" if not a.no_group_by_length else "shuffled",
        "precision": a.precision,
        "set": a.set,
        "bf16": peer.ran_mixed_precision() == "bf16",
        "gradient_checkpointing": a.gradient_checkpointing,
        "batch_size_pairs": a.batch_size,
        "n_pairs": a.n_pairs,
        "dataset_prep_seconds": round(timer.fit_start - t0, 2),
        "train_wall_seconds": round(timer.fit_end - timer.fit_start, 2),
        "total_wall_seconds": round(total, 2),
        **window,
    }
    theirs = peer.measure(a, fixtures, "trl_reward.py", ["--model", a.model, "--n-pairs", str(a.n_pairs),
                          "--batch-size", str(a.batch_size), *peer.window_args(a)])
    common.emit(peer.compare(ours, theirs, "pairs_per_sec", common.peak_rss_mb()))


if __name__ == "__main__":
    main()
