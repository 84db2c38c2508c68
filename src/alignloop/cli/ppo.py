"""``alignloop ppo``: RLHF of a policy against a reward (PPO, GRPO or RLOO)."""

from __future__ import annotations

import argparse
from pathlib import Path

from alignloop.cli.common import examples_epilog, run_training_command
from alignloop.config import PPOConfig, build_config


def run(args: argparse.Namespace) -> int:
    flags = {"model.name_or_path": args.model, "reward.model": args.reward_model, "data.train": args.prompts,
             "data.eval": args.eval_prompts, "output_dir": args.output, "ppo.algorithm": args.algorithm}
    cfg = build_config(PPOConfig, args.config, flags, args.overrides)

    def train() -> Path:
        from alignloop.train.ppo import run_ppo  # torch: only once the command runs

        return run_ppo(cfg, overwrite=args.overwrite)

    return run_training_command(args, train)


def add_command(sub) -> None:
    p = sub.add_parser(
        "ppo", help="RLHF: optimise the policy against a reward with PPO (or GRPO / RLOO)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sample responses from the policy, score them (reward model, Python functions, remote "
                    "scorer), and improve the policy with PPO while a KL penalty keeps it near the reference. "
                    "Writes model/, metrics.jsonl, samples.jsonl and eval.json (held-out reward before/after) "
                    "to --output; rerunning an unfinished run resumes it exactly.",
        epilog=examples_epilog(
            "alignloop ppo -c examples/ppo.yaml",
            "alignloop ppo --policy runs/sft/model --reward-model runs/rm --prompts data/prompts.jsonl "
            "--output runs/ppo ppo.kl_target=6 model.adapter=lora",
            "alignloop ppo -c examples/ppo.yaml --algorithm grpo ppo.samples_per_prompt=4",
        ),
    )
    p.add_argument("-c", "--config", help="YAML config file (fields as in examples/ppo.yaml)")
    p.add_argument("--policy", dest="model", help="policy to start from (an SFT run's model/ folder, hub id, "
                   ".gguf or short name)")
    p.add_argument("--reward-model", help="reward-model run folder (or its model/ folder)")
    p.add_argument("--prompts", help="prompt records {\"prompt\"} or {\"messages\"} (jsonl/csv/parquet)")
    p.add_argument("--eval-prompts", help="held-out prompts; without it a share of --prompts is held out")
    p.add_argument("--algorithm", choices=("ppo", "grpo", "rloo"), help="overrides ppo.algorithm")
    p.add_argument("--output", help="run folder to write (resumed if it holds an unfinished run)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --output")
    p.add_argument("--nproc", type=int, default=1,
                   help="sample and train with N processes (DDP through torchrun; on CPU over gloo on loopback)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="override any config field, e.g. ppo.kl_coef=0.1 generation.temperature=0.7")
    p.set_defaults(func=run)
