"""``alignloop sft``: supervised fine-tuning (causal LM, classification or tagging, by the config's task)."""

from __future__ import annotations

import argparse
from pathlib import Path

from alignloop.cli.common import add_training_flags, examples_epilog, run_training_command
from alignloop.config import ADAPTER_DEFAULT_LR, SFT_DEFAULT_EPOCHS, SFT_DEFAULT_LR, SFTConfig, build_config


def run(args: argparse.Namespace) -> int:
    flags = {"model.name_or_path": args.model, "data.train": args.data, "data.eval": args.eval_data,
             "data.test": args.test_data, "output_dir": args.output}
    cfg = build_config(SFTConfig, args.config, flags, args.overrides)

    def train() -> Path:
        from alignloop.train.supervised import run_supervised  # torch: only once the command runs

        return run_supervised(cfg, overwrite=args.overwrite)

    return run_training_command(args, train)


def add_command(sub) -> None:
    p = sub.add_parser(
        "sft", help="supervised fine-tuning: a causal LM, or a classification / tagging head",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a causal language model on prompt/completion, chat messages or plain text\n"
                    "(loss only on completions / assistant turns), or, with task=classification or\n"
                    "task=tagging, a new classification / token-tagging head on a pretrained model.\n\n"
                    "Defaults per task, as Hugging Face's Trainer and TRL set them (a value you set wins;\n"
                    "the run's config.yaml records what it trained with):\n"
                    f"  train.epochs  {SFT_DEFAULT_EPOCHS:g}\n"
                    f"  train.lr      {SFT_DEFAULT_LR['causal_lm']:.0e} causal LM (TRL's SFTConfig); "
                    f"{SFT_DEFAULT_LR['classification']:.0e} classification and tagging (the Trainer's);\n"
                    f"                {ADAPTER_DEFAULT_LR:.0e} with model.adapter=lora or qlora (TRL's advice "
                    "for adapters)",
        epilog=examples_epilog(
            "alignloop sft -c examples/sft.yaml",
            "alignloop sft --model smollm2-135m-instruct --data data/sft.jsonl --output runs/sft "
            "model.adapter=lora train.lr=2e-4",
            "alignloop sft -c examples/sft.yaml --nproc 2        # two processes (DDP)",
        ),
    )
    add_training_flags(p)
    p.set_defaults(func=run)
