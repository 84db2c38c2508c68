"""alignloop's RLHF stage on the peer benchmark's RL workload: samples/s with a generation / scoring /
training split and peak memory, printed as one ``BENCH_JSON {...}`` line.

    python bench/ppo.py --model tiny --fixtures /tmp/peer-bench/fixtures                  # PPO
    python bench/ppo.py --model tiny --fixtures /tmp/peer-bench/fixtures --algorithm rloo  # or grpo
    python bench/ppo.py --model tiny --fixtures /tmp/peer-bench/fixtures --peer-python ../peer-venv-ppo/bin/python
    python bench/ppo.py --model tiny --fixtures /tmp/peer-bench/fixtures --nproc 2 [--distributed fsdp]
    python bench/ppo.py --model tiny --fixtures /tmp/peer-bench/fixtures --generation-backend vllm  # .venv-vllm

The workload is the peer's (trl_ppo_legacy.py for PPO, trl_rl.py for RLOO/GRPO; see its README.md):
synth.rl_prompts(64); rollouts of 32 samples with exactly 64 new tokens each (T=1, top-k off, top-p 1,
KV cache; generation does not stop at EOS, the response still ends at its first EOS for the loss);
KL coefficient 0.05 to a frozen reference; 256 samples in all.
  ppo:       32 prompts per rollout; policy + value model (a sequence-classification copy of the policy
             fixture); reward = the tiny fixture as a sequence classifier (seed 43); 1 PPO epoch of
             4 micro-batches x 8 (one optimizer step).
  rloo/grpo: 8 prompts x 4 samples; reward = synth.synthetic_reward; 4 optimizer steps of 8 samples.
The first rollout and its update are warm-up and excluded; the window runs from the end of step 1 to the
end of the last step and includes everything the loop does (logging, checkpoint bookkeeping).
With ``--nproc N`` the same global workload runs data-parallel in N processes on this machine (torchrun; the
peer's thread count split between them), and peak RSS is the sum over the processes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import peer  # bench/ itself is on sys.path when a script here runs


def synthetic_reward(prompts, responses, topic, **_):
    """The peer's rule-based reward, in alignloop's reward-function signature."""
    import synth

    return [synth.synthetic_reward(p, c, t) for p, c, t in zip(prompts, responses, topic, strict=True)]


def save_seq_cls(src: Path, out: Path, seed: int, stage: str | None) -> Path:
    """The fixture as a 1-output sequence classifier with a head drawn from ``seed`` (as the peer does)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    meta = {"stage": stage, "normalization": {"mean": 0.0, "std": 1.0}} if stage else {}
    (out / "alignloop.json").write_text(json.dumps(meta))
    return out


def fixture_model(a: argparse.Namespace) -> Path:
    policy_dir = a.fixtures / ("llama-tiny" if a.model == "tiny" else "llama-25m")
    if not (policy_dir / "config.json").exists():
        raise SystemExit(f"missing fixture {policy_dir}: run the peer's make_fixtures.py (see its README.md)")
    return policy_dir


def write_inputs(a: argparse.Namespace, synth) -> None:
    """The prompts, and for PPO the reward model and the critic's starting point, into ``a.work``."""
    (a.work / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in synth.rl_prompts(64)))
    if a.algorithm == "ppo":
        save_seq_cls(a.fixtures / "llama-tiny", a.work / "reward", 43, "rm")
        save_seq_cls(fixture_model(a), a.work / "critic", 44, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("tiny", "25m"), default="tiny")
    ap.add_argument("--fixtures", type=Path, default=peer.PEER_BENCH / "fixtures", help="the peer's make_fixtures.py output")
    ap.add_argument("--algorithm", choices=("ppo", "rloo", "grpo"), default="ppo")
    ap.add_argument("--total-samples", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ppo-epochs", type=int, default=1)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine (torchrun)")
    ap.add_argument("--distributed", choices=("ddp", "fsdp"), default="ddp", help="train.distributed with --nproc > 1")
    ap.add_argument("--generation-backend", choices=("transformers", "vllm"), default="transformers")
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)  # the launcher's folder, shared by its processes
    peer.add_arguments(ap)
    a = ap.parse_args()

    sys.path.insert(0, str(peer.peer_folder(a.fixtures)))
    import common  # noqa: E402  (pins threads and offline env before torch loads)
    import synth  # noqa: E402

    torch = common.setup_torch()
    launcher = a.nproc > 1 and "LOCAL_RANK" not in os.environ
    a.nproc = int(os.environ.get("WORLD_SIZE", a.nproc))  # a launched process is not told --nproc (below)
    if a.work is None:  # the launcher (or the one process) writes the inputs its processes share
        a.work = Path(tempfile.mkdtemp(prefix="alignloop-bench-ppo-"))
        write_inputs(a, synth)
    if launcher:
        work = a.work
        # torchrun would take a --nproc among the script's arguments for its own --nproc-per-node
        forwarded = [x for i, x in enumerate(sys.argv[1:]) if "--nproc" not in (x, sys.argv[i])]
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        str(a.nproc), __file__, *forwarded, "--work", str(work)], check=True)
        ours = json.loads((work / "ours.json").read_text())
        peak = sum(ours.pop("peak_rss_mb_per_process"))
        emit(common, peer.compare(ours, measure_peer(a), "samples_per_sec", peak), peak)
        return

    torch.set_num_threads(max(1, common.NUM_THREADS // a.nproc))
    common.quiet_logs()
    from alignloop.config import PPOConfig, build_config
    from alignloop.runs import read_metrics
    from alignloop.train.ppo import run_ppo

    policy_dir = fixture_model(a)
    ppo = a.algorithm == "ppo"
    rollout = 32
    work = a.work
    prompts = work / "prompts.jsonl"
    # the same minibatches; with N processes each takes 1 / N of a micro-batch's rows where one would be left
    micro = min(8, (rollout if ppo else 8) // a.nproc)
    overrides = [
        f"ppo.steps={a.total_samples // rollout}", f"ppo.rollout_size={rollout}", f"ppo.kl_coef={a.kl_coef}",
        f"ppo.ppo_epochs={a.ppo_epochs if ppo else 1}",
        f"ppo.micro_batch_size={micro}", f"ppo.mini_batch_size={rollout if ppo else 8}", f"ppo.samples_per_prompt={1 if ppo else 4}",
        f"generation.max_new_tokens={a.new_tokens}", "generation.stop_on_eos=false", "generation.temperature=1.0",
        "generation.top_k=0", "generation.top_p=1.0", "data.eval_fraction=0", "data.max_prompt_len=4096",
        "train.report_to=[]", "train.lr=1e-6", "train.save_steps=1000000",
        "train.samples_to_log=0", "ppo.whiten_advantages=true", f"generation.backend={a.generation_backend}",
        f"train.distributed={a.distributed}", *peer.training_overrides(a, generation=True),
    ]
    if ppo:
        overrides += [f"reward.model={work / 'reward'}", f"ppo.critic_model={work / 'critic'}"]
    else:
        overrides += ["reward.functions=[__main__:synthetic_reward]"]
    cfg = build_config(PPOConfig, None, {"model.name_or_path": str(policy_dir), "data.train": str(prompts),
                                         "output_dir": str(work / "run"), "ppo.algorithm": a.algorithm}, overrides)
    run_ppo(cfg, overwrite=True)
    rows = read_metrics(work / "run" / "metrics.jsonl")
    timed = rows[1:]  # step 1 (first rollout + update) is warm-up
    secs = sum(r["time_step"] for r in timed)
    gen = sum(r["time_generation"] for r in timed)
    score = sum(r["time_scoring"] for r in timed)
    reward = sum(r["time_reward"] for r in timed)
    samples = rollout * len(timed)
    ours = {
        "bench": f"alignloop_{a.algorithm}",
        "model": a.model,
        "nproc": a.nproc,
        "distributed": a.distributed if a.nproc > 1 else None,
        "generation_backend": a.generation_backend,
        "precision": a.precision,
        "set": a.set,
        "bf16": peer.ran_mixed_precision() == "bf16",
        "gradient_checkpointing": a.gradient_checkpointing,
        "params": json.loads((work / "run" / "eval.json").read_text())["parameters"]["total"],
        "reward": "reward_model(tiny seq-cls)" if ppo else "rule_fn",
        "samples_per_rollout": rollout,
        "micro_batch": micro,
        "num_ppo_epochs": a.ppo_epochs if ppo else 1,
        "new_tokens": a.new_tokens,
        "kl_coef": a.kl_coef,
        "updates": len(rows),
        "timed_updates": len(timed),
        "timed_seconds": round(secs, 3),
        "samples": samples,
        "samples_per_sec": round(samples / secs, 3) if secs else None,
        "generated_tokens_per_sec_overall": round(samples * a.new_tokens / secs, 1) if secs else None,
        "generate_s": round(gen, 3),
        "score_s": round(score, 3),  # reward + reference (+ critic) forwards
        "reward_s": round(reward, 3),
        "score_other_s": round(score - reward, 3),  # reference (+ critic) forwards
        "train_s": round(secs - gen - score, 3),  # PPO epochs plus the loop's bookkeeping
        "generate_frac": round(gen / secs, 3) if secs else None,
        "generate_new_tokens_per_sec": round(samples * a.new_tokens / gen, 1) if gen else None,
        "mean_score_first": rows[0]["score_mean"],
        "mean_score_last": rows[-1]["score_mean"],
    }
    if a.nproc > 1:  # one of the launcher's processes: it gathers every process's peak and the figures
        peaks = [None] * a.nproc
        torch.distributed.all_gather_object(peaks, common.peak_rss_mb())
        if int(os.environ["RANK"]) == 0:
            (work / "ours.json").write_text(json.dumps({**ours, "peak_rss_mb_per_process": peaks}))
        return
    emit(common, peer.compare(ours, measure_peer(a), "samples_per_sec", common.peak_rss_mb()), common.peak_rss_mb())


def measure_peer(a: argparse.Namespace) -> dict | None:
    common_args = ["--model", a.model, "--new-tokens", str(a.new_tokens)]
    if a.algorithm == "ppo":  # TRL 1.12's PPOTrainer: 32 prompts a rollout (micro-batch 8 x 4), one step per epoch
        return peer.measure(a, a.fixtures, "trl_ppo_legacy.py", [*common_args, "--ppo-epochs", str(a.ppo_epochs),
                            "--total-samples", str(a.total_samples), "--kl-coef", str(a.kl_coef)])
    # 8 prompts x 4 samples a rollout, each prompt once: total samples / 4 prompts
    return peer.measure(a, a.fixtures, "trl_rl.py", [*common_args, "--trainer", a.algorithm, "--reward", "fn",
                        "--n-prompts", str(a.total_samples // 4), "--beta", str(a.kl_coef)])


def emit(common, result: dict, peak_rss_mb: float) -> None:
    """The peer's one BENCH_JSON line, with our peak RSS (summed over our processes with --nproc) instead of
    this process's own."""
    result = {**result, "peak_rss_mb": round(peak_rss_mb, 1), "versions": common.versions(),
              "torch_threads": common.NUM_THREADS}
    line = json.dumps(result)
    print("BENCH_JSON " + line, flush=True)
    if os.environ.get("BENCH_OUT"):
        with open(os.environ["BENCH_OUT"], "a") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    main()
