"""Direct preference losses against values worked out by hand (log sigma(x) = -log(1 + e^-x))."""

from __future__ import annotations

import math

import pytest
import torch

from alignloop.train.dpo_losses import (
    dpo_logits,
    hinge_loss,
    implicit_reward,
    ipo_loss,
    kto_loss,
    kto_reference_point,
    label_smoothing_loss,
    log_odds,
    orpo_loss,
    pair_loss,
    robust_loss,
    sft_loss,
    sigmoid_loss,
    simpo_loss,
)

T = torch.tensor
# One pair: policy log-probs pc=-2, pr=-5; reference rc=-3, rr=-4; 2 and 5 response tokens.
PC, PR, RC, RR, NC, NR = T([-2.0]), T([-5.0]), T([-3.0]), T([-4.0]), T([2.0]), T([5.0])
SOFTPLUS_1 = math.log1p(math.exp(-1.0))  # -log sigma(1) = 0.3132617
SOFTPLUS_M1 = 1 + SOFTPLUS_1  # -log sigma(-1) = log(1 + e) = 1.3132617


def close(x: torch.Tensor, value: float) -> None:
    assert x.item() == pytest.approx(value, abs=1e-6)


def test_dpo_logits_and_implicit_reward():
    # z = (pc - rc) - (pr - rr) = (-2 + 3) - (-5 + 4) = 1 + 1 = 2
    close(dpo_logits(PC, PR, RC, RR), 2.0)
    # r = beta (p - ref) = 0.1 * (-2 + 3) = 0.1
    close(implicit_reward(PC, RC, 0.1), 0.1)


def test_sigmoid_is_dpo():
    # beta z = 0.5 * 2 = 1 -> -log sigma(1) = log(1 + e^-1) = 0.3132617
    close(sigmoid_loss(T([2.0]), 0.5), SOFTPLUS_1)
    close(pair_loss("sigmoid", PC, PR, RC, RR, NC, NR, beta=0.5), SOFTPLUS_1)
    # z = 0: log 2 whatever beta
    close(sigmoid_loss(T([0.0]), 3.0), math.log(2))


def test_label_smoothing_cdpo_and_robust():
    # cDPO, eps 0.1, beta z = 1: 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.4132617
    close(label_smoothing_loss(T([2.0]), 0.5, 0.1), 0.9 * SOFTPLUS_1 + 0.1 * SOFTPLUS_M1)
    close(label_smoothing_loss(T([2.0]), 0.5, 0.1), 0.4132617)
    # robust: (0.9 * 0.3132617 - 0.1 * 1.3132617) / 0.8 = 0.1506094 / 0.8 = 0.1882617
    close(robust_loss(T([2.0]), 0.5, 0.1), 0.1882617)
    # eps 0 is plain DPO for both
    close(label_smoothing_loss(T([2.0]), 0.5, 0.0), SOFTPLUS_1)
    close(robust_loss(T([2.0]), 0.5, 0.0), SOFTPLUS_1)
    close(pair_loss("label_smoothing", PC, PR, RC, RR, NC, NR, beta=0.5, label_smoothing=0.1), 0.4132617)
    close(pair_loss("robust", PC, PR, RC, RR, NC, NR, beta=0.5, label_smoothing=0.1), 0.1882617)


def test_hinge():
    # max(0, 1 - beta z): z = 2, beta 0.5 -> 0; z = 1 -> 0.5; z = -2 -> 2
    assert hinge_loss(T([2.0, 1.0, -2.0]), 0.5).tolist() == [0.0, 0.5, 2.0]
    close(pair_loss("hinge", PC, PR, RC, RR, NC, NR, beta=0.25), 0.5)  # 1 - 0.25 * 2


def test_ipo_on_per_token_means():
    # (z - 1/(2 beta))^2 with beta 0.5: z = 0.7 -> (0.7 - 1)^2 = 0.09
    close(ipo_loss(T([0.7]), 0.5), 0.09)
    # per-token means: pc/2 = -1, pr/5 = -1, rc/2 = -1.5, rr/5 = -0.8 -> z = 0.5 - (-0.2) = 0.7
    close(pair_loss("ipo", PC, PR, RC, RR, NC, NR, beta=0.5), 0.09)


def test_simpo_reference_free_length_normalised():
    # avg_c = -1, avg_r = -2, beta 2, gamma 0.5: -log sigma(2 * 1 - 0.5) = log(1 + e^-1.5) = 0.2014133
    close(simpo_loss(T([-1.0]), T([-2.0]), 2.0, 0.5), 0.2014133)
    # pc = -2 over 2 tokens, pr = -10 over 5 tokens: the same means; no reference passed
    close(pair_loss("simpo", PC, T([-10.0]), None, None, NC, NR, beta=2.0, gamma=0.5), 0.2014133)


def test_orpo_odds_ratio_plus_nll():
    # p_c = 0.5: odds 1, log-odds 0; p_r = 0.2: odds 0.25, log-odds log 0.25.
    close(log_odds(T([math.log(0.5)])), 0.0)
    close(log_odds(T([math.log(0.2)])), math.log(0.25))
    # log odds ratio = log 4 -> sigma = 0.8; loss = -log 0.5 - 0.1 * log 0.8 = 0.6931472 + 0.0223144 = 0.7154615
    close(orpo_loss(T([math.log(0.5)]), T([math.log(0.2)]), 0.1), 0.7154615)
    close(pair_loss("orpo", T([2 * math.log(0.5)]), T([5 * math.log(0.2)]), None, None, NC, NR, beta=0.1),
          0.7154615)


def test_kto_reference_point_and_loss():
    policy_kl = T([0.3, 0.1], requires_grad=True)
    # z0 = mean(0.3 - 0.1, 0.1 - 0.1) = 0.1, detached
    z0 = kto_reference_point(policy_kl, T([0.1, 0.1]))
    close(z0, 0.1)
    assert not z0.requires_grad
    # a negative mean is clamped to 0
    close(kto_reference_point(T([0.0]), T([0.5])), 0.0)
    logratio = T([1.0, -1.0, 0.5])
    desirable = T([True, False, False])
    losses = kto_loss(logratio, desirable, z0, beta=1.0, desirable_weight=1.0, undesirable_weight=2.0)
    # desirable:   1 - sigma(1 - 0.1) = 1 - 0.7109495 = 0.2890505
    # undesirable: 2 * (1 - sigma(0.1 + 1)) = 2 * (1 - 0.7502601) = 0.4994798
    # undesirable: 2 * (1 - sigma(0.1 - 0.5)) = 2 * (1 - 0.4013123) = 1.1973754
    assert losses.tolist() == pytest.approx([0.2890505, 0.4994798, 1.1973754], abs=1e-6)


def test_sft_term_is_token_mean_nll():
    close(sft_loss(T([-0.75])), 0.75)


def test_gradients_push_chosen_up_and_rejected_down():
    for loss in ("sigmoid", "ipo", "label_smoothing", "robust", "simpo", "orpo"):
        pc, pr = T([-4.0], requires_grad=True), T([-4.0], requires_grad=True)
        ref = (T([-4.0]), T([-4.0])) if loss not in ("simpo", "orpo") else (None, None)
        pair_loss(loss, pc, pr, *ref, NC, NC, beta=0.1, label_smoothing=0.1).sum().backward()
        assert pc.grad.item() < 0 < pr.grad.item(), loss
