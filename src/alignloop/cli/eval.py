"""``alignloop eval``: a policy against a baseline (reward, gold, KL, win rates, safety)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from alignloop.cli.common import add_nproc_flag, examples_epilog, run_training_command
from alignloop.config import EvalConfig, build_config

EVAL_HELP = """\
Sample one response per prompt from the policy (and the baseline, with the same seed), then report:
reward-model score, gold score (a Python function), KL(policy || reference) on the policy's sampled
tokens, win rates of the policy over the baseline with 95% Wilson intervals, response length,
distinct-1/2 diversity, the share of responses caught by the safety check, the loss on SFT test
records, and blind side-by-side human win rates from the feedback database.
Writes eval.json and samples.jsonl (every prompt with each model's response and scores).
Each generation call (generation.batch_size prompts) is seeded by the seed and its first prompt, so
--nproc N gives what one process gives (the test loss and benchmarks run in the first process).

--benchmarks also scores both models on standard benchmarks through lm-evaluation-harness
(pip install 'alignloop[benchmarks]'), run on the loaded models in this process and offline: task
names, tags or groups of lm-eval task YAMLs in --benchmark-tasks DIR (examples/benchmarks has
demo_world_choice, multiple choice by log-likelihood, and demo_world_count, generate-until with exact
match; the tag demo_world runs both), or lm-eval's built-in tasks whose data is in the local datasets
cache. The scores go into eval.json (models.<name>.benchmarks), the report and the model card."""


def run(args: argparse.Namespace) -> int:
    flags = {"policy": args.policy, "baseline": args.baseline, "reference": args.reference,
             "reward_model": args.reward_model, "prompts": args.prompts, "gold": args.gold,
             "output_dir": args.output, "test_data": args.test_data, "max_prompts": args.max_prompts,
             "safety.classifier": args.safety_classifier, "safety.blocklist_file": args.blocklist_file,
             "feedback_db": args.feedback_db, "feedback_round": args.feedback_round,
             "benchmark_tasks": args.benchmark_tasks, "benchmark_limit": args.benchmark_limit}
    if args.benchmarks:
        flags["benchmarks"] = [t.strip() for t in args.benchmarks.split(",") if t.strip()]
    if args.blocklist:
        flags["safety.blocklist"] = [w.strip() for w in args.blocklist.split(",") if w.strip()]
    cfg = build_config(EvalConfig, args.config, flags, args.overrides)

    def evaluate() -> Path:
        # torch: only once the config is valid
        from alignloop.evaluate.eval import headline, run_eval
        from alignloop.generation.calls import processes

        out = run_eval(cfg, overwrite=args.overwrite)
        if processes().is_main_process:
            print(headline(json.loads((out / "eval.json").read_text())))
        return out

    return run_training_command(args, evaluate)


def add_command(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a policy against a baseline (reward, gold, KL, win rate, safety)",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=EVAL_HELP,
        epilog=examples_epilog(
            "alignloop eval --policy runs/demo/round-1/ppo/model --baseline runs/demo/sft/model "
            "--reward-model runs/demo/round-1/rm/model --prompts eval_prompts.jsonl "
            "--gold alignloop.data.synthetic:gold_breakdown --output runs/demo/round-1/eval",
            "alignloop eval -c examples/eval.yaml generation.temperature=0.7 --blocklist 'kill,bomb'",
            "alignloop eval --policy runs/demo/round-1/ppo/model --baseline runs/demo/sft/model "
            "--prompts runs/demo/data/eval_prompts.jsonl --benchmarks demo_world_choice,demo_world_count "
            "--benchmark-tasks examples/benchmarks --benchmark-limit 100 --output runs/demo/round-1/eval",
            "alignloop eval -c examples/eval.yaml --nproc 2   # two processes, each its share of the prompts",
        ),
    )
    p.add_argument("-c", "--config", help="YAML config file (fields of EvalConfig)")
    p.add_argument("--policy", help="the model to evaluate: a run's model/ folder, hub id or short name")
    p.add_argument("--baseline", help="the model to compare with (usually the SFT model); also the KL reference")
    p.add_argument("--reference", help="KL reference when it is not the baseline")
    p.add_argument("--reward-model", help="a reward run's model/ folder")
    p.add_argument("--prompts", help='held-out prompts: {"prompt"} or {"messages"} records')
    p.add_argument("--gold", help="gold scoring function 'package.module:function' (prompt, response) -> score")
    p.add_argument("--test-data", help="SFT-format test records: loss and perplexity of each model")
    p.add_argument("--max-prompts", type=int, help="evaluate at most this many prompts (default 256)")
    p.add_argument("--blocklist", help="comma-separated words / phrases counted as unsafe")
    p.add_argument("--blocklist-file", help="blocklist file, one word or phrase per line")
    p.add_argument("--safety-classifier", help="sequence classifier flagging unsafe text (see safety.unsafe_labels)")
    p.add_argument("--benchmarks", help="comma-separated lm-evaluation-harness tasks scored for both models")
    p.add_argument("--benchmark-tasks", metavar="DIR",
                   help="folder of lm-eval task YAMLs (e.g. examples/benchmarks)")
    p.add_argument("--benchmark-limit", type=int, help="at most this many examples per benchmark task")
    p.add_argument("--feedback-db", help="feedback database (URL or SQLite path): human side-by-side win rates")
    p.add_argument("--feedback-round", help="only this round's side-by-side votes")
    p.add_argument("--output", help="run folder to write (default runs/eval)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished evaluation in --output")
    add_nproc_flag(p, "evaluate with N processes through torchrun: each samples and scores its share of the "
                      "generation calls, the first gathers them and writes the same files as one process")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="override any config field, e.g. generation.temperature=0.7 seed=1")
    p.set_defaults(func=run)
