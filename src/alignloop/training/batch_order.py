"""Seeded, resumable order of training items: a pure function of (seed, epoch)."""

from __future__ import annotations

import random
from collections.abc import Sequence


def epoch_batches(n_items: int, batch_size: int, seed: int, epoch: int,
                  lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Micro-batches of item indices for one epoch, a pure function of (seed, epoch).

    With lengths, items are shuffled, cut into mega-batches of 32 batches, sorted by length
    inside each, batched, and the batch order is shuffled again: batches hold similar lengths
    (little padding) while the order stays random.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(n_items))
    rng.shuffle(order)
    if lengths is not None:
        mega = batch_size * 32
        grouped: list[int] = []
        for i in range(0, n_items, mega):
            chunk = order[i : i + mega]
            grouped.extend(sorted(chunk, key=lambda j: -lengths[j]))
        order = grouped
    batches = [order[i : i + batch_size] for i in range(0, n_items, batch_size)]
    if lengths is not None:
        rng.shuffle(batches)
    return batches
