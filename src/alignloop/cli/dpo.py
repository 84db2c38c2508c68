"""``alignloop dpo``: direct preference optimisation (DPO, IPO, cDPO, SimPO, ORPO, KTO) from human feedback."""

from __future__ import annotations

import argparse
from pathlib import Path

from alignloop.cli.common import add_training_flags, examples_epilog, run_training_command
from alignloop.config import DPOConfig, build_config

DPO_HELP = """\
Optimise a policy directly on human preferences: no reward model, no rollouts. Records (mixed if you like),
as `alignloop rm` reads them:
  pair      {"prompt", "chosen", "rejected"}
  HH-RLHF   {"chosen", "rejected"}: full dialogues, split at the last "\\n\\nAssistant:"
  ranking   {"prompt", "responses": [K], "ranking": [best .. worst]}: all C(K,2) pairs in one unit
            (dpo.ranking_pairs=best_vs_rest: only the best against the others)
  rating    {"prompt", "response", "score"} or "scores": pairs from rating differences above dpo.rating_margin
  unpaired  {"prompt", "completion", "label": true|false}: KTO only (dpo.loss=kto)
Prompts are text or chat messages. Losses (dpo.loss): sigmoid (DPO, default, beta 0.1), ipo, hinge,
label_smoothing (cDPO) and robust (with dpo.label_smoothing), simpo and orpo (no reference model), kto
(desirable / undesirable examples; pairs and ratings are split into such examples). The reference model
runs live or is precomputed once into the run folder (dpo.reference=precompute); with LoRA it is the base
with the adapter switched off. Writes model/, metrics.jsonl (implicit rewards, reward accuracy, margin,
log-probs) and eval.json (held-out pairs before and after); rerunning an unfinished run resumes it."""


def run(args: argparse.Namespace) -> int:
    flags = {"model.name_or_path": args.model, "data.train": args.data, "data.eval": args.eval_data,
             "data.test": args.test_data, "output_dir": args.output}
    cfg = build_config(DPOConfig, args.config, flags, args.overrides)

    def train() -> Path:
        from alignloop.train.dpo import run_dpo  # torch: only once the command runs

        return run_dpo(cfg, overwrite=args.overwrite)

    return run_training_command(args, train)


def add_command(sub) -> None:
    p = sub.add_parser(
        "dpo", help="direct preference optimisation (DPO, IPO, cDPO, SimPO, ORPO, KTO) from feedback",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=DPO_HELP,
        epilog=examples_epilog(
            "alignloop dpo -c examples/dpo.yaml",
            "alignloop dpo --policy runs/sft/model --data feedback.jsonl --output runs/dpo dpo.beta=0.1",
            "alignloop dpo -c examples/dpo.yaml dpo.loss=simpo dpo.beta=2.0 dpo.gamma=0.5 train.lr=5e-7",
            "alignloop dpo -c examples/dpo.yaml dpo.reference=precompute model.adapter=lora train.lr=5e-5",
            "alignloop dpo -c examples/dpo.yaml --nproc 2        # two processes (DDP)",
        ),
    )
    add_training_flags(p, model_flag="--policy")
    p.set_defaults(func=run)
