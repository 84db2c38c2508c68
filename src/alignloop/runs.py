"""The run folder every stage writes, and the atomic-write helpers that keep it consistent.

    <output_dir>/config.yaml     fully resolved config
    <output_dir>/model/          the trained model (save_pretrained)
    <output_dir>/metrics.jsonl   one JSON object per logged step
    <output_dir>/eval.json       final evaluation
    <output_dir>/checkpoints/    what resume needs
    <output_dir>/FINISHED        written last; a folder without it is not a finished run
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from alignloop.errors import UserError

FINISHED = "FINISHED"


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def to_json(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(obj, indent=indent, default=_json_default, allow_nan=True)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, to_json(obj) + "\n")


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Swap a fully written temp folder into place, so readers never see half a folder."""
    old = final_dir.with_name(final_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        final_dir.rename(old)
    tmp_dir.rename(final_dir)
    if old.exists():
        shutil.rmtree(old)


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def is_finished(self) -> bool:
        return (self.root / FINISHED).is_file()

    def prepare(self, overwrite: bool = False) -> None:
        """Refuse to clobber a finished run unless asked; an unfinished one is resumed."""
        if self.is_finished():
            if not overwrite:
                raise UserError(
                    f"{self.root} already holds a finished run; pass --overwrite or choose another --output"
                )
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)

    def mark_finished(self, summary: dict | None = None) -> None:
        atomic_write_json(self.root / FINISHED, {"finished_at": time.time(), **(summary or {})})


class MetricsLog:
    """Appends one JSON object per logged step. On resume, lines past the checkpoint are dropped
    so the file reads exactly as an uninterrupted run's would."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [rec for rec in read_metrics(self.path) if rec.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(to_json(rec, indent=None) + "\n" for rec in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(to_json(clean, indent=None) + "\n")
            fh.flush()


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a run folder's JSONL file (metrics.jsonl, samples.jsonl, stages.jsonl); [] when there
    is none. A last line cut off by a crash mid-write is left out; any other malformed line is an error
    naming file:line."""
    p = Path(path)
    if not p.is_file():
        return []
    lines = p.read_text(encoding="utf-8").splitlines()
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if lineno == len(lines):
                break
            raise UserError(f"{p}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(rec, dict):
            raise UserError(f"{p}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records
