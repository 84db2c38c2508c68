"""Seeded train / validation / test split for when only one data file is given."""

from __future__ import annotations

import random
from typing import TypeVar

T = TypeVar("T")


def split_by_seed(items: list[T], validation: float, test: float, seed: int) -> tuple[list[T], list[T], list[T]]:
    """Shuffle with ``seed`` and cut off the validation and test shares (each at least one item when
    its fraction is above zero and there is enough data)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n = len(items)
    n_val = max(1, round(n * validation)) if validation > 0 and n > 2 else 0
    n_test = max(1, round(n * test)) if test > 0 and n > 2 else 0
    val = [items[i] for i in order[:n_val]]
    tst = [items[i] for i in order[n_val : n_val + n_test]]
    train = [items[i] for i in order[n_val + n_test :]]
    return train, val, tst
