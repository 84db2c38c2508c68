"""``alignloop sweep``: hyperparameter search over an SFT config with Optuna (resumable)."""

from __future__ import annotations

import argparse
from pathlib import Path

from alignloop.cli.common import examples_epilog
from alignloop.config import SFTConfig, build_config
from alignloop.errors import UserError


def run(args: argparse.Namespace) -> int:
    if args.trials < 1:
        raise UserError("--trials must be at least 1")
    from alignloop.sweep import default_space, read_space, run_sweep, trials_table  # optuna and torch

    cfg = build_config(SFTConfig, args.config, {"model.name_or_path": args.model, "data.train": args.data},
                       args.overrides)
    space = read_space(args.space) if args.space else default_space(cfg)
    sweep_dir = Path(args.output or f"{cfg.output_dir}-sweep")
    study, best = run_sweep(cfg, args.trials, space, sweep_dir)
    print(trials_table(study, cfg.train.metric))
    print(f"best trial {study.best_trial.number}: {cfg.train.metric}={study.best_value:.4f}; "
          f"train it with: alignloop sft -c {best}")
    return 0


def add_command(sub) -> None:
    p = sub.add_parser(
        "sweep", help="hyperparameter search over an SFT config (Optuna; resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Search learning rate, batch size, epochs, weight decay, warm-up (and LoRA rank with an "
                    "adapter) to maximise the validation metric (train.metric). The study is kept in "
                    "<output>/study.db: rerun the same command to resume. Space file format: "
                    "'train.lr: {type: float, low: 1e-5, high: 1e-3, log: true}', "
                    "'train.batch_size: {type: categorical, choices: [8, 16]}'.",
        epilog=examples_epilog(
            "alignloop sweep -c examples/classification.yaml --trials 20",
            "alignloop sweep -c examples/tagging.yaml --trials 10 --space space.yaml --output runs/ner-sweep",
            "alignloop sft -c runs/ner-sweep/best.yaml      # train the winner",
        ),
    )
    p.add_argument("-c", "--config", required=True, help="the SFT config to tune (any task)")
    p.add_argument("--trials", type=int, required=True, help="total trials wanted (finished ones count)")
    p.add_argument("--space", help="YAML search space (dotted config key -> range); default per task")
    p.add_argument("--output", help="sweep folder (default: <output_dir>-sweep)")
    p.add_argument("--model", help="override model.name_or_path")
    p.add_argument("--data", help="override data.train")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides, e.g. train.metric=eval_f1")
    p.set_defaults(func=run)
