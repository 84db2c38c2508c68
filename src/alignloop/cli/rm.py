"""``alignloop rm``: train a reward model from pairs, rankings and ratings."""

from __future__ import annotations

import argparse
from pathlib import Path

from alignloop.cli.common import add_training_flags, examples_epilog, run_training_command
from alignloop.config import RMConfig, build_config

RM_HELP = """\
Train a reward model from human feedback. Records (mixed in one file if you like):
  pair      {"prompt", "chosen", "rejected", "margin"?, "criterion"?, "annotator"?}
  HH-RLHF   {"chosen", "rejected"}: full dialogues, split at the last "\\n\\nAssistant:"
  ranking   {"prompt", "responses": [K], "ranking": [best .. worst]}; a nested list is a tie: [2, [0, 3], 1]
  rating    {"prompt", "response", "scores": {criterion: value}} or {"prompt", "response", "score"}
Prompts are text or chat messages. The model/ folder is a transformers sequence-classification model
(one head, or one per criterion with multi_criteria=true) plus normalisation statistics."""


def run(args: argparse.Namespace) -> int:
    flags = {"model.name_or_path": args.model, "data.train": args.data, "data.eval": args.eval_data,
             "data.test": args.test_data, "output_dir": args.output}
    cfg = build_config(RMConfig, args.config, flags, args.overrides)

    def train() -> Path:
        from alignloop.train.reward import run_rm  # torch: only once the command runs

        return run_rm(cfg, overwrite=args.overwrite)

    return run_training_command(args, train)


def add_command(sub) -> None:
    p = sub.add_parser(
        "rm", help="train a reward model from pairs, rankings and ratings",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=RM_HELP,
        epilog=examples_epilog(
            "alignloop rm -c examples/rm.yaml",
            "alignloop rm --model runs/sft/model --data feedback.jsonl --output runs/rm train.lr=1e-5",
            "alignloop rm --model smollm2-135m-instruct --data hh.jsonl --output runs/rm model.adapter=lora "
            "multi_criteria=true",
        ),
    )
    add_training_flags(p)
    p.set_defaults(func=run)
