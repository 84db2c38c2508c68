"""``alignloop run PIPELINE.yaml``: the whole alignment loop as one resumable command."""

from __future__ import annotations

import argparse
import sys

from alignloop.cli.common import examples_epilog


def run(args: argparse.Namespace) -> int:
    # Every stage's module hangs off the pipeline (torch, the feedback app): only once the command runs.
    from alignloop.pipeline import WAITING_FOR_LABELS, LabelsMissing, load_pipeline, run_pipeline

    cfg = load_pipeline(args.config, args.overrides)
    try:
        report = run_pipeline(cfg, start_from=args.start_from, force=args.force)
    except LabelsMissing as exc:
        print(f"alignloop run: waiting for labels: {exc}", file=sys.stderr)
        return WAITING_FOR_LABELS
    print(f"report: {report}")
    return 0


def add_command(sub) -> None:
    p = sub.add_parser(
        "run", help="run a whole pipeline (SFT, then rounds of collect/label/rm/ppo/eval, report)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Runs the stages of PIPELINE.yaml in order, each in its own folder under output_dir. "
                    "Finished stages are skipped, so re-running the same command after a failure or a kill "
                    "continues where it stopped (inside a stage, from its last checkpoint). In human "
                    "feedback mode it stops after collect (exit code 3) with the labelling app's URL and "
                    "the number of labels still needed; run it again once they are in.",
        epilog=examples_epilog(
            "alignloop run examples/pipeline.yaml",
            "alignloop run examples/pipeline.yaml --from round-2/rm      # redo round 2 from its reward model",
            "alignloop run examples/pipeline.yaml --force rounds=3",
        ),
    )
    p.add_argument("config", help="pipeline YAML (see examples/pipeline.yaml)")
    p.add_argument("--from", dest="start_from", metavar="STAGE",
                   help="rerun this stage and every later one (e.g. sft, round-1/ppo, round-2/collect)")
    p.add_argument("--force", action="store_true", help="rerun every stage, finished or not")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="override a pipeline field")
    p.set_defaults(func=run)
