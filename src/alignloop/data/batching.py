"""Padding token sequences into batches: the one home for left and right padding.

Right padding (training, classification, reward scoring) keeps every sequence at the start of its row.
Left padding (generation) puts every row's last prompt token in the same column, so the next token of
every row lands in one column and one KV cache serves the whole batch. Shared rows (DPO, reward models)
put a prompt's responses in one row after one copy of the prompt, with a mask that keeps them apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


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


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions [B, T] of a padded batch: each row counts its real tokens from 0 (left padding stays at 0)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def distinct_rows(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The distinct rows (ids and mask alike) of a padded batch [B, T] and, for every row, the index of its copy
    among them [B]; None where no row repeats another (the samples of one prompt in RLOO and GRPO do)."""
    distinct, copy_of = torch.unique(torch.cat([ids, mask.long()], 1), dim=0, return_inverse=True)
    if len(distinct) == len(ids):
        return None
    width = ids.shape[1]
    return distinct[:, :width], distinct[:, width:].to(mask.dtype), copy_of


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


Rows = dict[str, torch.Tensor]


def prompt_response_batch(prompts: list[list[int]], responses: list[list[list[int]]], pad_id: int,
                          share_prompt: bool) -> Rows:
    """Rows holding every response of every prompt (``responses[i]`` answer ``prompts[i]``), right-padded.

    With ``share_prompt`` a prompt's responses share one row and the prompt is encoded once (a pair's chosen
    and rejected, a ranking's K responses): the row is the prompt up to its last token, then per response a
    segment of the prompt's last token and the response, at the positions it would have alone; a segment
    attends to the prompt and to itself only, so every response is scored as if it were alone after the
    prompt (the prompt's last token is repeated in each segment so that its position predicts that
    response's first token). Otherwise every response has a row of its own: prompt + response.

    ``input_ids`` / ``position_ids`` [B, W]; ``attention_mask`` [B, W] (a row per response: plain causal
    attention) or the boolean [B, 1, W, W] mask of the shared rows; ``select`` [B, W-1] (the positions whose
    next token is a response token); ``response_mask`` [n, R] (each response's tokens, row-major in the
    order ``select`` picks them); ``last`` [B, W] (each response's last position, row-major in response order:
    where a reward model reads it); ``tokens``: how many tokens the rows hold, padding excluded."""
    ids, segments, positions = [], [], []
    for prompt, answers in zip(prompts, responses, strict=True):
        head, last = prompt[:-1], prompt[-1]
        for group in ([answers] if share_prompt else [[r] for r in answers]):
            row, segment, position = list(head), [0] * len(head), list(range(len(head)))
            for k, r in enumerate(group, 1):
                row += [last, *r]
                segment += [k] * (len(r) + 1)
                position += range(len(head), len(head) + len(r) + 1)
            ids.append(row)
            segments.append(segment)
            positions.append(position)
    input_ids, padding = right_pad(ids, pad_id)
    segment, _ = right_pad(segments, -1)  # padding is segment -1: it attends to the prompt and itself only
    position_ids, _ = right_pad(positions, 0)
    select = (segment[:, 1:] == segment[:, :-1]) & (segment[:, 1:] > 0)
    last = (segment > 0) & (segment != F.pad(segment[:, 1:], (0, 1), value=-1))
    _, response_mask = right_pad([r for answers in responses for r in answers], pad_id)
    if int(segment.max()) <= 1:
        attention_mask = padding
    else:
        causal = torch.ones(segment.shape[1], segment.shape[1], dtype=torch.bool).tril()
        key, query = segment[:, None, :], segment[:, :, None]
        attention_mask = (causal & ((key == 0) | (key == query)))[:, None]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "select": select, "response_mask": response_mask, "last": last, "tokens": padding.sum()}
