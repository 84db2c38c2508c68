"""alignloop SFT training throughput on CPU: non-pad training tokens/second, steady state.

    python bench/sft.py --model tiny --fixtures /tmp/peer-bench/fixtures                  # padded
    python bench/sft.py --model tiny --fixtures /tmp/peer-bench/fixtures --variant packing
    python bench/sft.py --model tiny --fixtures /tmp/peer-bench/fixtures --precision bf16  # autocast
    python bench/sft.py --model 25m  --fixtures /tmp/peer-bench/fixtures --max-steps 32
    python bench/sft.py --model tiny --fixtures /tmp/peer-bench/fixtures --peer-python ../peer-venv/bin/python

Same workload as the peer's trl_sft.py / torch_floor_sft.py: synth.sft_examples(512)
prompt/completion records, loss on the completion only, batch 8, one epoch (64 steps), AdamW
lr 1e-5 constant, no weight decay, gradient clipping at 1.0, fp32 (``--precision bf16`` measures
bf16 autocast instead, ``auto`` our default), 2 threads, sdpa attention, no gradient checkpointing. It
runs the real ``alignloop sft`` stage (run_sft, with its default length-grouped batches; ``--no-group-by-length``
for plain shuffled batches) and times it from the end of optimizer step 3 to the end of the last
step, so collation, forward, backward, clipping, the optimizer, metrics logging and progress
bookkeeping all count. Tokens are the non-pad tokens of every timed batch (packing: every token
of every packed row except row padding). ``loss_curve`` is the mean token loss of every optimizer
step (bf16 against fp32: bench/README.md); ``--seed`` sets the batch order. ``--fixtures`` is the
folder make_fixtures.py wrote; the peer's synth.py and common.py are imported from the folder above it.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import peer  # bench/ itself is on sys.path when a script here runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["tiny", "25m"], default="tiny")
    ap.add_argument("--fixtures", required=True, help="fixtures/ folder written by the peer's make_fixtures.py")
    ap.add_argument("--variant", choices=["padded", "packing"], default="padded")
    ap.add_argument("--pack-length", type=int, default=256, help="packing: tokens per packed row")
    ap.add_argument("--n-examples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-steps", type=int, default=None, help="default: one full epoch")
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=42, help="train.seed: batch order (the fixture weights are fixed)")
    ap.add_argument("--no-group-by-length", action="store_true", help="batches in plain shuffled order")
    ap.add_argument("--peer-variant", choices=["padded", "padding_free", "packing"], default=None,
                    help="the peer's SFT variant (default: packing for --variant packing, else padding_free, "
                         "TRL's fastest on padded data)")
    peer.add_arguments(ap)
    a = ap.parse_args()

    fixtures = Path(a.fixtures).resolve()
    model_dir = fixtures / {"tiny": "llama-tiny", "25m": "llama-25m"}[a.model]
    if not (model_dir / "config.json").exists():
        sys.exit(f"missing fixture {model_dir}: run make_fixtures.py in the peer-bench folder first")
    sys.path.insert(0, str(peer.peer_folder(fixtures)))
    import common  # noqa: I001  (sets thread and offline environment variables before torch loads)
    import synth

    common.setup_torch()
    common.quiet_logs()
    import alignloop.train.sft as stage
    import alignloop.training.fit as fit_module
    from alignloop.config import SFTConfig, build_config
    from alignloop.models.load import count_parameters

    work = Path(tempfile.mkdtemp(prefix="alignloop-bench-sft-"))
    data = work / "sft.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in synth.sft_examples(a.n_examples)))
    packing = a.variant == "packing"
    overrides = ["train.lr=1e-5", "train.schedule=constant", "train.warmup_steps=0", "train.weight_decay=0",
                 f"train.batch_size={a.batch_size}", "train.epochs=1", "train.max_grad_norm=1.0",
                 *peer.training_overrides(a), "train.report_to=[]",
                 "train.log_steps=10", f"train.seed={a.seed}", "model.dtype=float32", "data.split.validation=0",
                 "data.clean.dedupe_exact=false", f"data.packing={packing}",
                 f"data.max_seq_len={a.pack_length if packing else 1024}",
                 f"train.group_by_length={not a.no_group_by_length}"]
    if a.max_steps:
        overrides.append(f"train.max_steps={a.max_steps}")
    cfg = build_config(SFTConfig, None, {"model.name_or_path": str(model_dir), "data.train": str(data),
                                         "output_dir": str(work / "run")}, overrides)

    batches: list[dict] = []
    step_ends: list[float] = []
    snaps: list[tuple] = []
    losses: list[float] = []  # mean token loss of every optimizer step: the loss curve
    step_loss = {"sum": 0.0, "units": 0}
    info: dict = {}
    real_fit = stage.fit
    real_micro_batches = fit_module.micro_batches

    def timed_fit(model, items, collate, loss_fn, *args, **kwargs):
        info["params"] = count_parameters(model)["total"]

        def recording_loss(m, batch):
            loss_sum, units, extras = loss_fn(m, batch)
            step_loss["sum"] += loss_sum.item()
            step_loss["units"] += units
            return loss_sum, units, extras

        def counting_micro_batches(groups, *mb_args, **mb_kwargs):
            # one record a step: a batch cut into pieces (train.micro_batch_tokens) is collated piece by piece
            pieces = real_micro_batches(groups, *mb_args, **mb_kwargs)
            batches.append({"examples": sum(sum(len(r) for r in g) if packing else len(g) for g in groups),
                            "tokens": sum(b["tokens"] for b in pieces),
                            "padded_tokens": sum(int(b["input_ids"].numel()) for b in pieces),
                            "loss_tokens": sum(b["loss_units"] for b in pieces)})
            return pieces

        def on_step(state):
            snaps.append(common.cpu_snapshot())
            step_ends.append(snaps[-1][0])
            losses.append(step_loss["sum"] / max(step_loss["units"], 1))
            step_loss.update(sum=0.0, units=0)

        t0 = time.perf_counter()
        fit_module.micro_batches = counting_micro_batches
        try:
            result = real_fit(model, items, collate, recording_loss, *args, on_step=on_step, **kwargs)
        finally:
            fit_module.micro_batches = real_micro_batches
        info["train_wall_seconds"] = round(time.perf_counter() - t0, 2)
        return result

    stage.fit = functools.partial(timed_fit)
    t0 = time.perf_counter()
    stage.run_sft(cfg)
    total_wall = time.perf_counter() - t0

    first = a.warmup_steps
    if len(step_ends) <= first:
        sys.exit(f"only {len(step_ends)} steps ran; need more than --warmup-steps={first}")
    window = batches[first : len(step_ends)]
    secs = step_ends[-1] - step_ends[first - 1]
    tokens = sum(b["tokens"] for b in window)
    padded = sum(b["padded_tokens"] for b in window)
    examples = sum(b["examples"] for b in window)
    loss_tokens = sum(b["loss_tokens"] for b in window)
    res = {
        "bench": "alignloop_sft",
        "model": a.model,
        "params": info["params"],
        "variant": a.variant + ("+no_group" if a.no_group_by_length else ""),
        "precision": a.precision,
        "set": a.set,
        "bf16": peer.ran_mixed_precision() == "bf16",
        "gradient_checkpointing": a.gradient_checkpointing,
        "group_by_length": not a.no_group_by_length,
        "batch_size": a.batch_size,
        "n_examples": a.n_examples,
        "pack_length": a.pack_length if packing else None,
        "steps": len(step_ends),
        "train_wall_seconds": info["train_wall_seconds"],
        "stage_wall_seconds": round(total_wall, 2),
        "timed_steps": len(window),
        "warmup_steps": first,
        "timed_seconds": round(secs, 3),
        "sec_per_step": round(secs / len(window), 4),
        "examples": examples,
        "examples_per_sec": round(examples / secs, 2),
        "tokens": tokens,
        "tokens_per_sec": round(tokens / secs, 1),
        "padded_tokens": padded,
        "padding_fraction": round(1 - tokens / padded, 4) if padded else 0.0,
        "loss_tokens": loss_tokens,
        "loss_tokens_per_sec": round(loss_tokens / secs, 1),
        "other_procs_cores": round(common.other_load(snaps[first - 1], snaps[-1]), 3),
        "seed": a.seed,
        "loss_curve": [round(v, 5) for v in losses],
    }
    shutil.rmtree(work, ignore_errors=True)
    peer_variant = a.peer_variant or ("packing" if packing else "padding_free")
    theirs = peer.measure(a, fixtures, "trl_sft.py", ["--model", a.model, "--variant", peer_variant,
                          "--n-examples", str(a.n_examples), "--batch-size", str(a.batch_size),
                          "--pack-length", str(a.pack_length), *peer.window_args(a)])
    common.emit(peer.compare(res, theirs, "tokens_per_sec", common.peak_rss_mb()))


if __name__ == "__main__":
    main()
