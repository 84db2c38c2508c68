"""The ``alignloop`` command itself: every command's --help shows its examples and loads no heavy library,
and a bad config key on any command that builds a config is one line and exit status 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = ["sft", "export", "collect", "label", "feedback", "rm", "score", "ppo", "dpo", "predict", "sweep", "eval",
            "report", "serve", "run", "demo"]
FEEDBACK_SUBCOMMANDS = ["export", "create-user", "invite", "create-round", "add-items"]
HEAVY = ["torch", "transformers", "peft", "accelerate", "sqlalchemy", "fastapi", "uvicorn", "optuna"]


def alignloop(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="100")
    return subprocess.run([sys.executable, "-m", "alignloop", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def examples(help_text: str) -> list[str]:
    """The example command lines of a --help text (the indented lines after 'examples:')."""
    assert "\nexamples:\n" in help_text, help_text
    tail = help_text.split("\nexamples:\n", 1)[1]
    return [ln.strip() for ln in tail.splitlines() if ln.startswith("  ")]


def test_top_level_help_lists_every_command_with_examples():
    proc = alignloop("--help")
    assert proc.returncode == 0, proc.stderr
    listed = re.findall(r"^    (\S+)\s{2,}\S", proc.stdout, flags=re.MULTILINE)
    assert listed == COMMANDS
    assert examples(proc.stdout) == ["alignloop sft -c examples/sft.yaml", "alignloop sft --help"]


@pytest.mark.parametrize("argv", [[c] for c in COMMANDS] + [["feedback", s] for s in FEEDBACK_SUBCOMMANDS],
                         ids=" ".join)
def test_every_command_help_has_examples_of_itself(argv):
    proc = alignloop(*argv, "--help")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith(f"usage: alignloop {' '.join(argv)} ")
    lines = examples(proc.stdout)
    assert lines and any(ln.startswith(f"alignloop {' '.join(argv)}") or f" alignloop {argv[0]}" in ln
                         for ln in lines), lines


def test_help_loads_no_heavy_library():
    # Every --help in one interpreter: none of them may import torch, the web stack or optuna.
    script = f"""
import sys
from alignloop.cli import main
for argv in {[[c] for c in COMMANDS] + [["feedback", s] for s in FEEDBACK_SUBCOMMANDS] + [[]]}:
    try:
        main([*argv, "--help"])
    except SystemExit:
        pass
print([m for m in {HEAVY} if m in sys.modules])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("argv", [["sft", "train.lrr=0.1"], ["rm", "train.lrr=0.1"], ["ppo", "ppo.kl_targt=1"],
                                  ["eval", "generation.temprature=0.7"]], ids=" ".join)
def test_unknown_config_key_is_one_line_and_exit_2(argv, tmp_path):
    proc = alignloop("-q", *argv, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    key = argv[1].split("=")[0]
    assert len(err.splitlines()) == 1 and f"unknown key '{key}'" in err, err
    assert err.startswith(f"alignloop {argv[0]}: error: ") and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written before the config was valid


def test_sweep_and_run_refuse_an_unknown_key_in_one_line(tmp_path):
    sft_cfg = tmp_path / "sft.yaml"
    sft_cfg.write_text(json.dumps({"model": {"name_or_path": "x"}, "train": {"lrr": 0.1}}))
    proc = alignloop("sweep", "-c", str(sft_cfg), "--trials", "2", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "train.lrr" in proc.stderr
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(json.dumps({"roundz": 2}))
    proc = alignloop("run", str(pipeline), cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "roundz" in proc.stderr
