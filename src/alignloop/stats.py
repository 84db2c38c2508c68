"""The statistics every stage reports the same way: win rates with a Wilson score interval, paired
score differences with a t interval, and how
much annotators agree (Kendall's tau between rankings, Krippendorff's alpha on ratings, the share of
annotator pairs that gave the same label).

Pure functions of numbers and labels; the stages gather the inputs (scores, votes, database rows).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass

import krippendorff
import numpy as np
from scipy import stats as scipy_stats


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (``successes`` may hold halves from ties); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class WinRate:
    win_rate: float
    ci_low: float
    ci_high: float
    wins: int
    ties: int
    losses: int
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def win_rate(wins: int, ties: int, losses: int) -> WinRate:
    """A win counts 1, a tie 1/2, a loss 0; the win rate is their mean (0.5 with no trials), with a 95%
    Wilson interval on that many trials."""
    n = wins + ties + losses
    score = wins + 0.5 * ties
    lo, hi = wilson_interval(score, n)
    return WinRate(score / n if n else 0.5, lo, hi, wins, ties, losses, n)


def paired_win_rate(a: Sequence[float], b: Sequence[float], tie_tolerance: float = 1e-9) -> WinRate:
    """How often ``a[i]`` beats ``b[i]`` (scores of two models on the same prompts); closer than
    ``tie_tolerance`` is a tie."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} scores against {len(b)}")
    wins = sum(x - y > tie_tolerance for x, y in zip(a, b, strict=True))
    losses = sum(y - x > tie_tolerance for x, y in zip(a, b, strict=True))
    return win_rate(wins, len(a) - wins - losses, losses)


@dataclass
class MeanDifference:
    mean: float
    ci_low: float
    ci_high: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> MeanDifference:
    """The mean of ``a[i] - b[i]`` (two models scored on the same prompts) with a Student-t interval: the
    question "is the gain real" asked of the scores themselves, not only of who won each prompt. With fewer
    than two pairs the interval is unbounded."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} scores against {len(b)}")
    diffs = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(diffs)
    mean = float(diffs.mean()) if n else 0.0
    if n < 2:
        return MeanDifference(mean, -math.inf, math.inf, n)
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1) * diffs.std(ddof=1) / math.sqrt(n))
    return MeanDifference(mean, mean - half, mean + half, n)


def ranking_tau(a: Sequence[Hashable], b: Sequence[Hashable]) -> float | None:
    """Kendall's tau between two rankings (items best first) of the same items; None when undefined
    (fewer than two items, different items, or no variation)."""
    from scipy.stats import kendalltau  # scipy.stats takes most of a second to import

    if len(a) < 2 or sorted(a) != sorted(b):
        return None
    pos_b = {c: i for i, c in enumerate(b)}
    tau = kendalltau(list(range(len(a))), [pos_b[c] for c in a]).statistic
    return None if math.isnan(tau) else float(tau)


def interval_alpha(ratings: np.ndarray) -> float | None:
    """Krippendorff's alpha at the interval level: rows are annotators, columns rated units, NaN where an
    annotator did not rate a unit. Only units rated by two or more count; None when alpha is undefined
    (fewer than two annotators, no such unit, or no variation in their values)."""
    paired = (~np.isnan(ratings)).sum(axis=0) >= 2
    values = ratings[:, paired]
    if ratings.shape[0] < 2 or not paired.any() or np.nanstd(values) == 0:
        return None
    return float(krippendorff.alpha(reliability_data=values, level_of_measurement="interval"))


@dataclass
class PairwiseAgreement:
    items: int  # items labelled by two or more annotators
    pairs: int  # annotator pairs over those items
    agreeing: int  # of them, pairs that gave the same label

    @property
    def rate(self) -> float | None:
        return self.agreeing / self.pairs if self.pairs else None


def pairwise_agreement(labels_per_item: Iterable[Sequence[Hashable]]) -> PairwiseAgreement:
    """Over items with two or more labels (one per annotator), how many annotator pairs gave the same one."""
    items = pairs = agreeing = 0
    for labels in labels_per_item:
        if len(labels) < 2:
            continue
        items += 1
        for x, y in itertools.combinations(labels, 2):
            pairs += 1
            agreeing += x == y
    return PairwiseAgreement(items, pairs, agreeing)
