"""The ``alignloop`` command: one subcommand per stage.

User errors (bad config, bad data, missing files) print one line and exit with status 2; they
never show a traceback. Each stage's subcommand lives next to the stage and registers itself
through ``add_command(subparsers)``; COMMAND_MODULES lists them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable

from alignloop.errors import UserError

# Modules that each define add_command(subparsers); imported lazily-light (no torch at import time).
COMMAND_MODULES: list[str] = [
    "alignloop.feedback.cli",
    "alignloop.train.reward_cli",
    "alignloop.train.ppo_cli",
    "alignloop.predict",
    "alignloop.sweep",
    "alignloop.evaluate.cli",
    "alignloop.serve.cli",
    "alignloop.pipeline",
    "alignloop.demo",
]


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    for noisy in ("accelerate", "datasets", "peft", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def examples_epilog(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {ln}" for ln in lines)


def add_training_flags(p: argparse.ArgumentParser, model_flag: str = "--model") -> None:
    """Flags shared by every training stage: config, inputs, output, overrides, launching."""
    p.add_argument("-c", "--config", help="YAML config file (fields as in examples/*.yaml)")
    p.add_argument(model_flag, dest="model", help="base model: local folder, hub id, .gguf file or short name "
                   "(smollm2-135m-instruct)")
    p.add_argument("--data", help="training data file (jsonl/jsonl.gz/csv/parquet/saved dataset folder)")
    p.add_argument("--eval-data", help="validation data; without it a share of --data is held out by seed")
    p.add_argument("--test-data", help="test data, evaluated once at the end into eval.json")
    p.add_argument("--output", help="run folder to write (resumed if it holds an unfinished run)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --output")
    p.add_argument("--nproc", type=int, default=1,
                   help="train with N processes (DDP through torchrun; on CPU over gloo on loopback)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="override any config field, e.g. train.lr=1e-5 model.adapter=lora")


def launch_distributed(nproc: int) -> int:
    """Re-run this very command under torchrun with ``nproc`` processes on this machine."""
    argv = []
    skip = False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        argv.append(a)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "alignloop", *argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.call(cmd, env=env)


def run_training_command(args: argparse.Namespace, run: Callable[[], object]) -> int:
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return launch_distributed(args.nproc)
    out = run()
    if out is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"finished: {out}")
    return 0


# ---------------------------------------------------------------- sft


def _cmd_sft(args: argparse.Namespace) -> int:
    from alignloop.config import SFTConfig, build_config

    flags = {"model.name_or_path": args.model, "data.train": args.data, "data.eval": args.eval_data,
             "data.test": args.test_data, "output_dir": args.output}
    cfg = build_config(SFTConfig, args.config, flags, args.overrides)

    def run():
        from alignloop.train.supervised import run_supervised

        return run_supervised(cfg, overwrite=args.overwrite)

    return run_training_command(args, run)


def _add_sft(sub) -> None:
    p = sub.add_parser(
        "sft", help="supervised fine-tuning of a causal LM",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a causal language model on prompt/completion, chat messages or plain text. "
                    "Loss is only on completions / assistant turns.",
        epilog=examples_epilog(
            "alignloop sft -c examples/sft.yaml",
            "alignloop sft --model smollm2-135m-instruct --data data/sft.jsonl --output runs/sft "
            "model.adapter=lora train.lr=2e-4",
            "alignloop sft -c examples/sft.yaml --nproc 2        # two processes (DDP)",
        ),
    )
    add_training_flags(p)
    p.set_defaults(func=_cmd_sft)


# ---------------------------------------------------------------- export


def _cmd_export(args: argparse.Namespace) -> int:
    from alignloop.models.export import export_model

    out = export_model(args.model, args.output, merge=args.merge)
    print(f"exported: {out}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="write a standalone model folder (LoRA merged with --merge)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples_epilog("alignloop export --model runs/sft/model --output exported/sft --merge"),
    )
    p.add_argument("--model", required=True, help="a run's model/ folder (full weights or LoRA adapter)")
    p.add_argument("--output", required=True, help="folder to write")
    p.add_argument("--merge", action="store_true", help="merge a LoRA adapter into the base weights")
    p.set_defaults(func=_cmd_export)


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
    _add_sft(sub)
    _add_export(sub)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        msg = " ".join(str(exc).split("\n"))
        print(f"alignloop {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"alignloop {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
