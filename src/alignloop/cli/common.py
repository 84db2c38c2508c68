"""What every command shares: the examples epilog, the training flags, the relaunch under torchrun, the
``--db`` flag of the feedback commands, and running a command so a user error is one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable

from alignloop.errors import UserError

DEFAULT_DB = "feedback.db"


def quiet_libraries() -> None:
    """Silence the libraries' progress bars, telemetry and info logs; our own logging says what happens."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import transformers  # deferred: the command's --help must not pay for it

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    for noisy in ("accelerate", "alembic", "datasets", "peft", "torch.distributed"):
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
    add_nproc_flag(p, "train with N processes through torchrun (train.distributed: ddp, or fsdp to shard the "
                      "model; on CPU over gloo on loopback)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="override any config field, e.g. train.lr=1e-5 model.adapter=lora")


def add_nproc_flag(p: argparse.ArgumentParser, help: str) -> None:
    """``--nproc N``: the command relaunches itself under torchrun (see run_training_command)."""
    p.add_argument("--nproc", type=int, default=1, help=help)


def add_db_flag(p: argparse.ArgumentParser) -> None:
    """``--db`` of the feedback commands: the database the labels live in."""
    p.add_argument("--db", default=os.environ.get("ALIGNLOOP_DB", DEFAULT_DB),
                   help="SQLite file path or database URL (postgresql://user@host/db); "
                        f"default $ALIGNLOOP_DB or {DEFAULT_DB}")


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
    """Run a stage (training, collect, eval) here, or relaunch the command under torchrun when ``--nproc``
    asks for more processes (the relaunched ranks carry LOCAL_RANK and run the stage themselves)."""
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return launch_distributed(args.nproc)
    out = run()
    if "LOCAL_RANK" in os.environ:
        from alignloop.training.distributed import close_process_group  # torch: only under torchrun
        close_process_group()
    if out is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"finished: {out}")
    return 0


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command: a user error (bad config, bad data, missing file) is one line on stderr and
    exit status 2, never a traceback; Ctrl-C says how to resume and exits 130."""
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        msg = " ".join(str(exc).split("\n"))
        print(f"alignloop {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"alignloop {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
