"""Reading records from JSONL (.gz too), CSV, Parquet, saved `datasets` folders and CoNLL files.

Every record keeps where it came from (``file:line``) so that validation errors can name it.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignloop.errors import UserError


@dataclass
class Record:
    data: dict[str, Any]
    where: str  # "path:line" (or "path:row N" for columnar formats)


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "dataset"
    name = path.name.lower().removesuffix(".gz")
    for suffix, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".ndjson", "jsonl"), (".csv", "csv"),
                        (".tsv", "csv"), (".parquet", "parquet"), (".conll", "conll"), (".conll.txt", "conll"),
                        (".bio", "conll")):
        if name.endswith(suffix):
            return fmt
    raise UserError(f"{path}: cannot tell the format from the file name; set data.format "
                    "(jsonl, csv, parquet, dataset, conll)")


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def _read_jsonl(path: Path) -> Iterator[Record]:
    with _open_text(path) as fh:
        try:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(obj, dict):
                    raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield Record(obj, f"{path}:{lineno}")
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not UTF-8 text ({exc.reason})") from None
        except (OSError, EOFError) as exc:  # corrupt gzip
            raise UserError(f"{path}: cannot read ({exc})") from None


def _read_csv(path: Path) -> Iterator[Record]:
    delimiter = "\t" if path.name.lower().removesuffix(".gz").endswith(".tsv") else ","
    with _open_text(path) as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        if reader.fieldnames is None:
            return
        for row in reader:
            if None in row:
                raise UserError(f"{path}:{reader.line_num}: more values than header columns")
            yield Record({k: _csv_value(v) for k, v in row.items()}, f"{path}:{reader.line_num}")


def _csv_value(raw: str | None) -> Any:
    """CSV cells are text; a cell holding a JSON list/object (e.g. messages, tokens) is decoded."""
    if raw is None:
        return None
    s = raw.strip()
    if s[:1] in "[{":
        try:
            return json.loads(s)
        except json.JSONDecodeError:
            return raw
    return raw


def _read_table(path: Path, fmt: str) -> Iterator[Record]:
    # pyarrow and datasets take most of a second to import; every JSONL reader (the feedback app's too) needs neither.
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise UserError(f"{path}: cannot read parquet ({exc})") from None
    else:
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise UserError(f"{path}: not a saved datasets folder ({exc})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise UserError(f"{path}: saved DatasetDict has splits {list(ds)}; point at one split's folder")
            ds = ds["train"]
        rows = ds.to_list()
    for i, row in enumerate(rows, 1):
        yield Record(row, f"{path}:row {i}")


def _read_conll(path: Path) -> Iterator[Record]:
    """Token <whitespace> tag per line; blank (or whitespace-only) lines end a sentence;
    -DOCSTART- lines are document separators and are skipped."""
    tokens: list[str] = []
    tags: list[str] = []
    start = 1
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                if tokens:
                    yield Record({"tokens": tokens, "tags": tags}, f"{path}:{start}")
                tokens, tags = [], []
                continue
            parts = line.split()
            if parts[0] == "-DOCSTART-":
                continue
            if len(parts) < 2:
                raise UserError(f"{path}:{lineno}: expected 'TOKEN TAG', got {line.strip()!r}")
            if not tokens:
                start = lineno
            tokens.append(parts[0])
            tags.append(parts[-1])
    if tokens:
        yield Record({"tokens": tokens, "tags": tags}, f"{path}:{start}")


def read_records(path: str | Path, fmt: str = "auto", column_map: dict[str, str] | None = None) -> list[Record]:
    """All records of one file, column-mapped; raises UserError naming the file for anything unreadable."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"data file not found: {p}")
    fmt = detect_format(p) if fmt == "auto" else fmt
    reader = {"jsonl": _read_jsonl, "csv": _read_csv, "conll": _read_conll}.get(fmt)
    records = list(reader(p) if reader else _read_table(p, fmt))
    if not records:
        raise UserError(f"{p}: no records (the file is empty)")
    if column_map:
        for rec in records:
            rec.data = {column_map.get(k, k): v for k, v in rec.data.items()}
    return records
