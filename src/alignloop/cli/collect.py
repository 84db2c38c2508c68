"""``alignloop collect``: K candidate responses per prompt, written into a feedback round."""

from __future__ import annotations

import argparse

from alignloop.cli.common import add_db_flag, add_nproc_flag, examples_epilog, run_training_command
from alignloop.config import SamplingConfig, sampling_from_flags


def run(args: argparse.Namespace) -> int:
    sampling = sampling_from_flags(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                   max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size,
                                   backend=args.backend)

    def collect_round() -> None:
        # torch and the database: only once the command runs
        from alignloop.feedback.collect import collect
        from alignloop.generation.calls import processes

        n = collect(args.model, args.prompts, args.db, args.round, k=args.k, sampling=sampling,
                    overlap=args.overlap, model_label=args.model_label)
        if processes().is_main_process:
            print(f"collected {args.k} candidates for each of {n} prompts into round {args.round!r} "
                  f"({args.db})")

    return run_training_command(args, collect_round)


def add_command(sub) -> None:
    p = sub.add_parser(
        "collect", help="generate K candidate responses per prompt into a feedback round",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sample K candidates per prompt with the sampling defaults every stage shares (PPO's "
                    "rollouts too): temperature 1, top-k and top-p off, 64 new tokens, stop at EOS. "
                    "Runs on the GPU when there is one. Each generation call (--batch-size prompts) is "
                    "seeded by --seed and its first prompt, so --nproc N writes what one process writes.",
        epilog=examples_epilog("alignloop collect --model runs/sft/model --prompts prompts.jsonl --k 4 --round r1",
                               "alignloop collect --model smollm2-135m-instruct --prompts prompts.jsonl --round r1 "
                               "--db postgresql://feedback@db/feedback --temperature 0.8",
                               "alignloop collect --model runs/sft/model --prompts prompts.jsonl --round r1 "
                               "--nproc 2   # two processes, each sampling its share"))
    p.add_argument("--model", required=True, help="model folder, hub id, .gguf or short name")
    p.add_argument("--prompts", required=True, help="JSONL/CSV/parquet with 'prompt' or 'messages' per record")
    p.add_argument("--round", required=True, help="round to add to (created with default criteria if new)")
    p.add_argument("--k", type=int, default=4, help="candidates per prompt (default 4)")
    add_db_flag(p)
    defaults = SamplingConfig()
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="(default %(default)s)")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus mass; 1 = off (default %(default)s)")
    p.add_argument("--top-k", type=int, default=defaults.top_k, help="0 = off (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="(default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation call, each with its K "
                   "samples (default %(default)s)")
    p.add_argument("--overlap", type=int, default=1, help="people per item when the round is created here")
    p.add_argument("--backend", choices=["transformers", "vllm"], default=defaults.backend,
                   help="who samples: the model itself, or a vLLM engine (needs vllm; default %(default)s)")
    p.add_argument("--model-label", help="name stored with each candidate (default: --model)")
    add_nproc_flag(p, "sample with N processes through torchrun, each its share of the generation calls (the "
                      "first process writes the round; the same candidates as one process)")
    p.set_defaults(func=run)
