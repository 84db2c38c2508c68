"""What the label-predicting stages (classification, tagging) share: label checks and prediction files."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from alignloop.config import SFTConfig
from alignloop.errors import UserError
from alignloop.runs import atomic_write_text, to_json


def check_known(examples: Sequence, names: set[str], field: str, values: Callable[[object], list[str]]) -> None:
    """Every label of a validation/test example must exist in training: a head cannot predict a
    class it never had, and the score would silently count it as wrong."""
    for e in examples:
        for v in values(e):
            if v not in names:
                known = ", ".join(sorted(names)[:20])
                raise UserError(f"{e.where}: field '{field}': {v!r} does not appear in the training data "
                                f"(known: {known})")


def check_metric(cfg: SFTConfig, known: Sequence[str]) -> None:
    if cfg.train.metric not in known:
        raise UserError(f"train.metric: {cfg.train.metric!r} is not reported for task {cfg.task}; "
                        f"choose from {', '.join(known)}")


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    """Prediction rows, one JSON object a line, written atomically."""
    atomic_write_text(path, "".join(to_json(r, indent=None) + "\n" for r in rows))
