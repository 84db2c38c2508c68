"""``alignloop export``: a standalone model folder from a run's model (LoRA merged with --merge)."""

from __future__ import annotations

import argparse

from alignloop.cli.common import examples_epilog


def run(args: argparse.Namespace) -> int:
    from alignloop.models.export import export_model  # torch: only once the command runs

    out = export_model(args.model, args.output, merge=args.merge)
    print(f"exported: {out}")
    return 0


def add_command(sub) -> None:
    p = sub.add_parser(
        "export", help="write a standalone model folder (LoRA merged with --merge)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples_epilog("alignloop export --model runs/sft/model --output exported/sft --merge"),
    )
    p.add_argument("--model", required=True, help="a run's model/ folder (full weights or LoRA adapter)")
    p.add_argument("--output", required=True, help="folder to write")
    p.add_argument("--merge", action="store_true", help="merge a LoRA adapter into the base weights")
    p.set_defaults(func=run)
