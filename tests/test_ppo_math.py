"""PPO / GRPO / RLOO arithmetic against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from alignloop.rl import ppo_math as pm


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                          atol=tol)


def test_gae_by_hand():
    # one response of 3 tokens, then padding; gamma 0.9, lambda 0.5
    rewards = torch.tensor([[1.0, 0.0, 2.0, 7.0]])
    values = torch.tensor([[0.5, 1.0, 1.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = pm.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    d2 = 2.0 + 0.9 * 0.0 - 1.5  # the value after the last token is 0; padding values are ignored
    d1 = 0.0 + 0.9 * 1.5 - 1.0
    d0 = 1.0 + 0.9 * 1.0 - 0.5
    a2 = d2
    a1 = d1 + 0.45 * a2
    a0 = d0 + 0.45 * a1
    assert close(adv, [[a0, a1, a2, 0.0]])
    assert close(ret, [[a0 + 0.5, a1 + 1.0, a2 + 1.5, 0.0]])


def test_gae_gamma1_lambda1_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.1, -0.2, 3.0]])
    values = torch.tensor([[1.0, 2.0, 0.5]])
    mask = torch.ones(1, 3)
    adv, ret = pm.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert close(ret, [[2.9, 2.8, 3.0]])
    assert close(adv, [[1.9, 0.8, 2.5]])


def test_masked_whiten_ignores_padding():
    x = torch.tensor([[1.0, 3.0, 100.0], [5.0, -50.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    out = pm.masked_whiten(x, mask)
    vals = torch.tensor([1.0, 3.0, 5.0, 7.0])  # mean 4, unbiased var 20/3
    expected = (vals - 4.0) / math.sqrt(20 / 3)
    assert close(out[mask.bool()], expected, 1e-4)
    assert out[0, 2] == 0 and out[1, 1] == 0
    kept = pm.masked_whiten(x, mask, shift_mean=False)
    assert close(kept[mask.bool()], expected + 4.0, 1e-4)


def test_kl_penalty_placement_score_on_last_response_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -9.0], [-2.0, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    score = torch.tensor([10.0, -4.0])
    rewards, kl = pm.kl_penalised_rewards(score, logp, ref, mask, kl_coef=0.1, estimator="k1")
    assert close(kl, [[0.5, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert close(rewards, [[-0.05, 0.1, 10.0, 0.0], [-0.1 - 4.0, 0.0, 0.0, 0.0]])


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert close(pm.kl_estimate(logp, ref, "k1"), [math.log(2)])
    assert close(pm.kl_estimate(logp, ref, "k2"), [0.5 * math.log(2) ** 2])
    assert close(pm.kl_estimate(logp, ref, "k3"), [0.5 - 1 + math.log(2)])  # r' = 0.25/0.5
    assert pm.kl_estimate(ref, logp, "k3") >= 0


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 3.0]]))
    adv = torch.tensor([[1.0, 1.0, -2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last token is padding: its huge ratio must not count
    loss, stats = pm.policy_loss(new, old, adv, mask, clip=0.2)
    # per token max(-A r, -A clip(r)): -min(1.5, 1.2)=-1.2; -min(0.5, 0.8)=-0.5; max(2.2, 2.2)=2.2
    assert close(loss, (-1.2 - 0.5 + 2.2) / 3)
    assert close(stats["clip_frac"], 1 / 3)  # only the first token is clipped


def test_clipped_value_loss_by_hand():
    values = torch.tensor([[2.0, 0.0, 5.0]])
    old = torch.tensor([[1.0, 0.5, 0.0]])
    returns = torch.tensor([[1.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = pm.value_loss(values, old, returns, mask, clip=0.2)
    # token 0: unclipped (2-1)^2=1, clipped v=1.2 -> 0.04 -> max 1; token 1: 1 vs v=0.3 -> 0.49 -> 1
    assert close(loss, 0.5 * (1.0 + 1.0) / 2)
    plain, _ = pm.value_loss(values, old, returns, mask, clip=None)
    assert close(plain, 0.5 * (1.0 + 1.0) / 2)
    values2 = torch.tensor([[1.1, 0.0, 5.0]])
    loss2, stats2 = pm.value_loss(values2, old, returns, mask, clip=0.2)
    # token 0: 0.01 vs clipped 1.1 -> 0.01; token 1: v=0 -> 1.0 vs clipped 0.3 -> 0.49 -> 1.0
    assert close(loss2, 0.5 * (0.01 + 1.0) / 2)
    assert close(stats2["vf_clip_frac"], 0.0)


def test_group_normalised_advantages():
    scores = torch.tensor([1.0, 3.0, 0.0, 0.0, 2.0, 4.0])
    adv = pm.group_advantages(scores, group_size=2)
    s = math.sqrt(2.0)  # sample std of {1, 3}
    assert close(adv[:2], [-1 / (s + 1e-4), 1 / (s + 1e-4)], 1e-4)
    assert close(adv[2:4], [0.0, 0.0])  # identical scores: no signal, no division by zero
    assert close(pm.group_advantages(scores, 2, scale=False), [-1, 1, 0, 0, -1, 1])


def test_leave_one_out_baseline():
    scores = torch.tensor([1.0, 2.0, 6.0, 10.0, 10.0, 10.0])
    adv = pm.leave_one_out_advantages(scores, group_size=3)
    assert close(adv, [1 - 4.0, 2 - 3.5, 6 - 1.5, 0, 0, 0])
    with pytest.raises(ValueError):
        pm.leave_one_out_advantages(scores, group_size=1)


def test_kl_controller_fixed_and_adaptive():
    fixed = pm.KLController(0.05)
    fixed.update(100.0, 32)
    assert fixed.coef == 0.05
    ctl = pm.KLController(0.1, target=6.0, horizon=100)
    ctl.update(12.0, 10)  # error clipped to +0.2 -> coef * (1 + 0.2 * 10/100)
    assert ctl.coef == pytest.approx(0.1 * 1.02)
    ctl.update(4.5, 10)  # error -0.25 clipped to -0.2
    assert ctl.coef == pytest.approx(0.1 * 1.02 * 0.98)
    other = pm.KLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.state_dict() == ctl.state_dict()


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert pm.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert pm.explained_variance(torch.full_like(returns, 2.0), returns, mask) == pytest.approx(0.0, abs=1e-6)


def test_negative_kl_warning_fires_once_per_persistent_streak():
    streak, fired = 0, []
    for kl in [-0.1, -0.2, 0.3, -0.1, -0.1, -0.1, -0.1, 0.0]:
        streak, warn = pm.negative_kl_streak(streak, kl, patience=3)
        fired.append(warn)
    assert fired == [False, False, False, False, False, True, False, False]
