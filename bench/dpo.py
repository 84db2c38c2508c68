"""alignloop's DPO stage on the peer benchmark's DPO workload: preference pairs/second, steady state, and
peak memory, printed as one ``BENCH_JSON {...}`` line.

    python bench/dpo.py --model tiny --fixtures /tmp/peer-bench/fixtures                  # live reference
    python bench/dpo.py --model tiny --fixtures /tmp/peer-bench/fixtures --precompute-ref  # one cached pass
    python bench/dpo.py --model tiny --fixtures /tmp/peer-bench/fixtures --peer-python ../peer-venv/bin/python

Same workload as the peer's trl_dpo.py: synth.preference_pairs(256) with explicit prompts, the fixture
causal LM as policy and a frozen copy of it as reference, batch 8 pairs (chosen and rejected in one
forward: 16 sequences), sigmoid loss, beta 0.1, AdamW lr 1e-5 constant, fp32, 2 threads, max length 1024,
1 epoch (32 steps). It runs the real ``alignloop dpo`` stage (run_dpo) and times its loop from the end of
step 3: a step ends when the next one starts collating, so the window covers collation, the policy and
reference forwards, backward, clipping, the optimizer and the per-step bookkeeping. With
``--precompute-ref`` the reference pass runs before training (as TRL runs it in the trainer's constructor)
and is reported in ``dataset_prep_seconds``, outside the window.
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("tiny", "25m"), default="tiny")
    ap.add_argument("--fixtures", type=Path, default=peer.PEER_BENCH / "fixtures", help="the peer's make_fixtures.py output")
    ap.add_argument("--n-pairs", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-steps", type=int, default=None, help="default: one full epoch")
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--precompute-ref", action="store_true", help="dpo.reference=precompute")
    peer.add_arguments(ap)
    a = ap.parse_args()

    fixtures = a.fixtures.resolve()
    model_dir = fixtures / {"tiny": "llama-tiny", "25m": "llama-25m"}[a.model]
    if not (model_dir / "config.json").exists():
        sys.exit(f"missing fixture {model_dir}: run make_fixtures.py in the peer-bench folder first")
    sys.path.insert(0, str(peer.peer_folder(fixtures)))
    import common  # noqa: I001  (pins threads and offline env before torch loads)
    import synth

    common.setup_torch()
    common.quiet_logs()
    import alignloop.train.dpo as stage
    from alignloop.config import DPOConfig, build_config

    work = Path(tempfile.mkdtemp(prefix="alignloop-bench-dpo-"))
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in synth.preference_pairs(a.n_pairs)))
    overrides = ["dpo.loss=sigmoid", "dpo.beta=0.1", f"dpo.reference={'precompute' if a.precompute_ref else 'live'}",
                 "train.lr=1e-5", "train.schedule=constant", "train.warmup_steps=0", "train.weight_decay=0",
                 f"train.batch_size={a.batch_size}", "train.epochs=1", *peer.training_overrides(a),
                 "train.report_to=[]", "train.log_steps=1000000", "train.seed=42", "model.dtype=float32",
                 "data.split.validation=0", "data.split.test=0", "data.max_seq_len=1024"]
    if a.max_steps:
        overrides.append(f"train.max_steps={a.max_steps}")
    cfg = build_config(DPOConfig, None, {"model.name_or_path": str(model_dir), "data.train": str(data),
                                         "output_dir": str(work / "run")}, overrides)

    timer = FitTimer(stage, lambda b: {"pairs": int(len(b["chosen"])), "tokens": b["tokens"],
                                      "padded_tokens": int(b["input_ids"].numel())}, common)
    t0 = time.perf_counter()
    stage.run_dpo(cfg, overwrite=True)
    total = time.perf_counter() - t0
    shutil.rmtree(work)

    window = timer.steady_state(a.warmup_steps, common)
    ours = {
        "bench": "alignloop_dpo",
        "model": a.model,
        "params": int(timer.params),
        "variant": "precompute_ref" if a.precompute_ref else "ref_model_each_step",
        "precision": a.precision,
        "set": a.set,
        "bf16": peer.ran_mixed_precision() == "bf16",
        "gradient_checkpointing": a.gradient_checkpointing,
        "batch_size_pairs": a.batch_size,
        "n_pairs": a.n_pairs,
        "beta": 0.1,
        "loss_type": "sigmoid",
        "dataset_prep_seconds": round(timer.fit_start - t0, 2),
        "dataset_prep_includes": "tokenization" + (" + reference log-prob pass" if a.precompute_ref else ""),
        "train_wall_seconds": round(timer.fit_end - timer.fit_start, 2),
        "total_wall_seconds": round(total, 2),
        **window,
    }
    theirs = peer.measure(a, fixtures, "trl_dpo.py", ["--model", a.model, "--n-pairs", str(a.n_pairs),
                          "--batch-size", str(a.batch_size), *peer.window_args(a),
                          *(["--precompute-ref"] if a.precompute_ref else [])])
    common.emit(peer.compare(ours, theirs, "pairs_per_sec", common.peak_rss_mb()))


if __name__ == "__main__":
    main()
