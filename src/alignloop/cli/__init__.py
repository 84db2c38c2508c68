"""The ``alignloop`` command: one subcommand per stage, one thin module per subcommand.

Each module here parses its flags (``add_command`` registers the subparser, with examples in its --help),
builds the stage's config and calls the stage's run function; the stage logic lives in the stage modules.
Stage modules that pull in torch, transformers or the web stack are imported inside the run functions, so
``alignloop --help`` and ``alignloop COMMAND --help`` stay fast. Only ``alignloop/__main__.py`` imports this
package; no stage module does.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap

from alignloop.cli import (
    collect,
    demo,
    dpo,
    export,
    feedback,
    label,
    ppo,
    predict,
    report,
    rm,
    run,
    score,
    serve,
    sft,
    sweep,
)
from alignloop.cli import eval as eval_command
from alignloop.cli.common import examples_epilog, quiet_libraries, run_command

# In the order `alignloop --help` lists them.
COMMANDS = (sft, export, collect, label, feedback, rm, score, ppo, dpo, predict, sweep, eval_command, report,
            serve, run, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignloop",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            alignloop: SFT -> human feedback -> reward model -> PPO -> evaluate -> deploy.
            Each stage reads a YAML config (plus key=value overrides) and writes one run folder."""),
        epilog=examples_epilog("alignloop sft -c examples/sft.yaml", "alignloop sft --help"),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    quiet_libraries()
    return run_command(args)
