"""Padding token sequences into batches: the one home for left and right padding.

Right padding (training, classification, reward scoring) keeps every sequence at the start of its row.
Left padding (generation) puts every row's last prompt token in the same column, so the next token of
every row lands in one column and one KV cache serves the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int, pad_to_multiple_of: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, W], attention mask [B, W]) with every sequence at the start of its row. W is the longest
    length rounded up to a multiple of ``pad_to_multiple_of`` (fewer distinct shapes on GPUs)."""
    width = max(len(s) for s in seqs)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, W], attention mask [B, W]) with every sequence at the end of its row."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def left_pad_tensor(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """``x`` grown to ``length`` along ``dim`` with zeros in front (KV caches and masks of a running batch)."""
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Inference batches of indices of similar length (less padding); callers restore the original order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
