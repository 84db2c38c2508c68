"""Every supervised stage's data: read, validate, clean, and a seeded train / validation / test split
for when only one data file is given."""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from alignloop.config import DataConfig
from alignloop.data.clean import clean_records
from alignloop.data.io import Record, read_records
from alignloop.errors import UserError

T = TypeVar("T")


def split_by_seed(items: list[T], validation: float, test: float, seed: int,
                  group: Callable[[T], Hashable] | None = None) -> tuple[list[T], list[T], list[T]]:
    """Shuffle with ``seed`` and cut off the validation and test shares (each at least one unit when
    its fraction is above zero and there is enough data).

    With ``group``, the units are the groups of items sharing ``group(item)`` and a group never straddles
    two splits: a reward model's ranking and the ratings of the same responses must not land on both
    sides, or validation measures memory instead of generalisation to new prompts.
    """
    keys = [group(it) for it in items] if group is not None else list(range(len(items)))
    units = list(dict.fromkeys(keys))  # first-seen order, so the result depends only on the seed
    random.Random(seed).shuffle(units)
    n = len(units)
    n_val = max(1, round(n * validation)) if validation > 0 and n > 2 else 0
    n_test = max(1, round(n * test)) if test > 0 and n > 2 else 0
    where = {u: 1 for u in units[:n_val]} | {u: 2 for u in units[n_val : n_val + n_test]}
    parts: tuple[list[T], list[T], list[T]] = ([], [], [])
    for it, k in zip(items, keys, strict=True):
        parts[where.get(k, 0)].append(it)
    return parts


def load_splits(data: DataConfig, seed: int, parse: Callable[[Record], Any],
                group: Callable[[Any], Hashable] | None = None) -> tuple[dict[str, list], dict]:
    """Read, clean, validate (``parse`` maps a Record to a typed example) and split the data (keeping
    examples with the same ``group(example)`` key on one side, see split_by_seed).

    Returns {"train", "validation", "test"} lists and a report of what cleaning did per file.
    """
    report: dict = {}

    def load(path: str | None, name: str) -> list:
        if not path:
            return []
        records = read_records(path, data.format, data.column_map)
        for rec in records:  # validate everything (original line numbers) before cleaning touches it
            parse(rec)
        kept, counts = clean_records(records, data.clean)
        report[name] = {"file": str(path), **counts}
        if not kept:
            raise UserError(f"{path}: every record was removed by cleaning (see data.clean)")
        return [parse(r) for r in kept]

    train = load(data.train, "train")
    val = load(data.eval, "validation")
    test = load(data.test, "test")
    if not val:
        frac_test = 0.0 if test else data.split.test
        train, val, split_test = split_by_seed(train, data.split.validation, frac_test, seed, group)
        test = test or split_test
        report["split"] = {"seed": seed, "by": "group" if group else "record", "train": len(train),
                           "validation": len(val), "test": len(test)}
    return {"train": train, "validation": val, "test": test}, report
