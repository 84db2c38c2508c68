"""``alignloop report``: one self-contained HTML report of a pipeline run (inline SVG plots, samples)."""

from __future__ import annotations

import argparse

from alignloop.cli.common import examples_epilog


def run(args: argparse.Namespace) -> int:
    from alignloop.evaluate.report import build_report  # the evaluation layer: only once the command runs

    print(f"report: {build_report(args.run, output=args.output, gold=args.gold)}")
    return 0


def add_command(sub) -> None:
    r = sub.add_parser(
        "report", help="self-contained HTML report of a pipeline run (plots and sample responses)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Reads a pipeline run folder (sft/, round-N/rm, round-N/ppo, round-N/eval) and writes "
                    "one HTML file with inline SVG plots; it opens offline and needs no JavaScript.",
        epilog=examples_epilog("alignloop report runs/demo",
                               "alignloop report runs/demo --gold alignloop.data.synthetic:gold_total"),
    )
    r.add_argument("run", help="pipeline run folder")
    r.add_argument("--output", help="HTML file to write (default RUN/report.html)")
    r.add_argument("--gold", help="gold function scoring PPO samples, for gold-vs-reward as KL grows")
    r.set_defaults(func=run)
