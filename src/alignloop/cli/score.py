"""``alignloop score``: records scored by a trained reward model (normalised rewards, JSONL out)."""

from __future__ import annotations

import argparse

from alignloop.cli.common import examples_epilog


def run(args: argparse.Namespace) -> int:
    from alignloop.models.scoring import score_file  # torch: only once the command runs

    n = score_file(args.model, args.data, args.output, batch_size=args.batch_size, device=args.device)
    print(f"scored {n} records: {args.output}")
    return 0


def add_command(sub) -> None:
    s = sub.add_parser(
        "score", help="score records with a trained reward model (normalised rewards, JSONL out)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Adds the normalised reward to every record: 'reward' for {prompt, response}, "
                    "'chosen_reward'/'rejected_reward' for pairs, 'rewards' for rankings.",
        epilog=examples_epilog("alignloop score --model runs/rm/model --data samples.jsonl --output scored.jsonl"),
    )
    s.add_argument("--model", required=True, help="a reward run's model/ folder")
    s.add_argument("--data", required=True, help="records to score (jsonl/csv/parquet/saved dataset)")
    s.add_argument("--output", required=True, help="JSONL file to write")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    s.set_defaults(func=run)
