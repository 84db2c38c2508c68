"""Reward-model objectives as pure functions of reward tensors (no model, no batching).

Units: one *comparison group* (a preference pair, or all responses ranked for one prompt) or one
rating record is one unit. A group's loss is the mean Bradley-Terry loss over its pairs, as in
InstructGPT's K-wise loss, so a prompt ranked with K responses weighs as much as one pair and its
C(K,2) correlated comparisons do not dominate the batch. Functions returning sums over units let
the trainer average exactly over every unit in an optimizer step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry(delta: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair loss -log sigmoid(r_chosen - r_rejected - margin) (Llama 2's margin form):
    a margin demands that the chosen response win by at least that much before the loss fades."""
    if margin is not None:
        delta = delta - margin
    return F.softplus(-delta)


def ranking_pairs(groups: list[list[int]]) -> list[tuple[int, int]]:
    """(better, worse) index pairs of a ranking given as tie groups, best first; ties give no pair."""
    return [(a, b) for i, hi in enumerate(groups) for lo in groups[i + 1 :] for a in hi for b in lo]


def kwise_ranking_loss(rewards: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """InstructGPT's K-wise loss for one prompt: mean BT loss over all pairs of its ranking.
    ``rewards`` holds one reward per response, each response encoded once."""
    pairs = ranking_pairs(groups)
    if not pairs:
        raise ValueError("the ranking has no ordered pair (every response is tied)")
    win = torch.tensor([a for a, _ in pairs], device=rewards.device)
    lose = torch.tensor([b for _, b in pairs], device=rewards.device)
    return bradley_terry(rewards[win] - rewards[lose]).mean()


def group_mean_sum(values: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Sum over groups of each group's mean value (``group[i]`` is value i's group id, every id used)."""
    totals = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, group, values)
    counts = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(
        0, group, torch.ones_like(values))
    return (totals / counts.clamp(min=1)).sum()


def rating_targets(values: torch.Tensor, low: torch.Tensor, high: torch.Tensor, scale: float) -> torch.Tensor:
    """Ratings on [low, high] mapped linearly onto [-scale, +scale], the reward's own units."""
    return (2 * (values - low) / (high - low) - 1) * scale


def regression_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target) ** 2


def ordinal_loss(pred: torch.Tensor, level: torch.Tensor, n_levels: torch.Tensor, scale: float) -> torch.Tensor:
    """All-threshold ordinal logistic loss with fixed, evenly spaced cut points.

    A rating at integer level ``level`` (0-based) of ``n_levels`` should put the reward above every cut
    point below it and under every one above it; the cut points sit halfway between the levels' places
    on [-scale, +scale], so the ordinal and regression losses share units. Per-element ``n_levels``
    lets criteria with different scales share one call.
    """
    width = int(n_levels.max().item()) - 1
    k = torch.arange(width, device=pred.device, dtype=pred.dtype)
    steps = (n_levels - 1).to(pred.dtype).clamp(min=1)
    cuts = ((2 * (k[None, :] + 0.5) / steps[:, None]) - 1) * scale
    valid = k[None, :] < steps[:, None]
    above = (k[None, :] < level[:, None]).to(pred.dtype) * 2 - 1  # +1 where the rating is above cut k
    losses = F.softplus(-above * (pred[:, None] - cuts)) * valid
    return losses.sum(-1)


def centering_penalty(rewards: torch.Tensor) -> torch.Tensor:
    """Mean squared reward: pulls rewards towards zero so their scale stays put (BT is shift-invariant)."""
    return (rewards ** 2).mean()
