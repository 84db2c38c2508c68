"""Seeded train / validation / test split for when only one data file is given."""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable
from typing import TypeVar

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
