"""Win rates, Wilson intervals and agreement statistics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alignloop.stats import (
    interval_alpha,
    paired_difference,
    paired_win_rate,
    pairwise_agreement,
    ranking_tau,
    wilson_interval,
    win_rate,
)

Z2 = 1.96**2


def test_wilson_interval_by_hand():
    # 8 of 10: centre (0.8 + z²/20) / (1 + z²/10), half-width z·sqrt(0.016 + z²/400) / (1 + z²/10)
    centre = (0.8 + Z2 / 20) / (1 + Z2 / 10)
    half = 1.96 * math.sqrt(0.016 + Z2 / 400) / (1 + Z2 / 10)
    assert wilson_interval(8, 10) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    # 0 of 5: the low end is 0 and the high end z² / (n + z²)
    lo, hi = wilson_interval(0, 5)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(Z2 / (5 + Z2))
    assert wilson_interval(5, 5)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_win_rate_counts_a_tie_as_half():
    wr = win_rate(2, 1, 1)
    assert (wr.win_rate, wr.n, wr.wins, wr.ties, wr.losses) == (0.625, 4, 2, 1, 1)
    assert (wr.ci_low, wr.ci_high) == wilson_interval(2.5, 4)
    assert wr.as_dict() == {"win_rate": 0.625, "ci_low": wr.ci_low, "ci_high": wr.ci_high, "wins": 2, "ties": 1,
                            "losses": 1, "n": 4}
    none = win_rate(0, 0, 0)
    assert (none.win_rate, none.ci_low, none.ci_high) == (0.5, 0.0, 1.0)


def test_paired_win_rate_compares_prompt_by_prompt():
    wr = paired_win_rate([1.0] * 8 + [0.0] * 2, [0.5] * 10)
    assert (wr.wins, wr.losses, wr.ties, wr.win_rate) == (8, 2, 0, 0.8)
    assert (wr.ci_low, wr.ci_high) == wilson_interval(8, 10)
    half = paired_win_rate([1.0, 0.5, 0.5 + 1e-12], [0.5, 0.5, 0.5])
    assert half.win_rate == 0.5 + 0.5 / 3 and half.ties == 2
    many = paired_win_rate([1.0] * 80 + [0.0] * 20, [0.5] * 100)
    assert many.ci_high - many.ci_low < wr.ci_high - wr.ci_low
    with pytest.raises(ValueError):
        paired_win_rate([1.0], [1.0, 2.0])


def test_paired_difference_by_hand():
    # differences 1, 2, 3: mean 2, sample std 1, t(0.975, 2 df) = 4.302652729749464 -> half-width 4.3027 / sqrt(3)
    d = paired_difference([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    half = 4.302652729749464 / math.sqrt(3)
    assert (d.mean, d.n) == (2.0, 3)
    assert (d.ci_low, d.ci_high) == pytest.approx((2.0 - half, 2.0 + half))
    assert d.as_dict() == {"mean": 2.0, "ci_low": d.ci_low, "ci_high": d.ci_high, "n": 3}
    # the same differences on more prompts: a narrower interval around the same mean
    many = paired_difference([2.0, 4.0, 6.0] * 20, [1.0, 2.0, 3.0] * 20)
    assert many.mean == pytest.approx(2.0) and many.ci_high - many.ci_low < d.ci_high - d.ci_low
    one = paired_difference([1.0], [0.0])
    assert (one.mean, one.ci_low, one.ci_high) == (1.0, -math.inf, math.inf)
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0])


def test_ranking_tau_by_hand():
    # b puts a's items at positions 0, 2, 1: two concordant pairs, one discordant -> (2 - 1) / 3
    assert ranking_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert ranking_tau(["x", "y"], ["y", "x"]) == pytest.approx(-1.0)
    assert ranking_tau([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert ranking_tau([1], [1]) is None
    assert ranking_tau([1, 2], [1, 3]) is None


def test_interval_alpha_by_hand():
    # Units {1, 2} and {3, 3}: D_o = (1/4)·(2·1²) = 0.5; over all 4 values D_e = 2·11 / (4·3); alpha = 8/11.
    assert interval_alpha(np.array([[1.0, 3.0], [2.0, 3.0]])) == pytest.approx(8 / 11)
    # A unit only one annotator rated does not count.
    assert interval_alpha(np.array([[1.0, 3.0, 5.0], [2.0, 3.0, np.nan]])) == pytest.approx(8 / 11)
    assert interval_alpha(np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])) == pytest.approx(1.0)
    assert interval_alpha(np.array([[1.0, 2.0]])) is None  # one annotator
    assert interval_alpha(np.array([[2.0, 2.0], [2.0, 2.0]])) is None  # no variation
    assert interval_alpha(np.array([[1.0, np.nan], [np.nan, 2.0]])) is None  # no unit rated twice


def test_pairwise_agreement_counts_annotator_pairs_per_item():
    got = pairwise_agreement([[True, True, False], [True], ["a", "a"]])
    # item 1: 3 pairs, 1 agrees; item 2 has one label; item 3: 1 pair, agrees
    assert (got.items, got.pairs, got.agreeing, got.rate) == (2, 4, 2, 0.5)
    assert pairwise_agreement([]).rate is None
