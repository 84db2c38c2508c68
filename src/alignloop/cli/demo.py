"""``alignloop demo``: the whole alignment loop, offline, in one command."""

from __future__ import annotations

import argparse

from alignloop.cli.common import examples_epilog
from alignloop.errors import UserError


def run(args: argparse.Namespace) -> int:
    if args.model not in (None, "tiny", "smollm2-135m-instruct"):
        raise UserError(f"--model: 'tiny' or 'smollm2-135m-instruct' (got {args.model!r})")
    from alignloop.demo import FULL, REAL, run_demo  # the whole pipeline: only once the command runs

    real = args.model == "smollm2-135m-instruct"
    output = args.output or ("runs/demo-smollm2" if real else "runs/demo")
    out = run_demo(output, REAL if real else FULL, args.seed, args.model if real else None, args.force,
                   args.algorithm)
    print(out["table"])
    print(f"report: {out['report']}")
    print(f"wall time: {out['seconds'] / 60:.1f} min")
    return 0 if all(out["checks"].values()) else 1


def add_command(sub) -> None:
    p = sub.add_parser(
        "demo", help="the whole loop offline: demo world, tiny model, SFT, 2 RLHF rounds, report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Builds the demo world (corpus, tasks, simulated annotators), pretrains a tiny Llama on "
                    "it, then runs the pipeline: SFT and two rounds of collect -> simulated labelling through "
                    "the feedback app's HTTP API -> reward model -> PPO -> evaluation, and writes the HTML "
                    "report. Prints a summary table; exits 1 if a check of a healthy loop failed. About 6 "
                    "minutes on 2 idle CPU cores (the real model: about 16 with native bf16); re-running resumes.",
        epilog=examples_epilog("alignloop demo", "alignloop demo --output runs/demo-seed1 --seed 1",
                               "alignloop demo --model smollm2-135m-instruct   # real model + LoRA, ~16 min on 2 cores",
                               "alignloop demo --algorithm dpo --output runs/demo-dpo   # online DPO rounds"),
    )
    p.add_argument("--model", help="tiny (default) or smollm2-135m-instruct")
    p.add_argument("--output", help="run folder (default runs/demo or runs/demo-smollm2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rerun every pipeline stage")
    p.add_argument("--algorithm", choices=("ppo", "dpo"), default="ppo",
                   help="what each round trains after labelling: RM + PPO (default) or DPO on all feedback so far")
    p.set_defaults(func=run)
