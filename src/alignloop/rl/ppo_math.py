"""The arithmetic of PPO, GRPO and RLOO as small pure functions on tensors.

Conventions: response tensors are ``[B, T]`` with a 0/1 ``mask`` that is 1 on generated tokens
up to and including the first EOS, and 0 after it (right padding). Every reduction is masked, so
padding never reaches a loss or a statistic.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    total = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / total.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; ``shift_mean=False`` keeps the mean (used for rewards,
    whose sign carries meaning). Masked-out entries come back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy.

    k1 = log r (unbiased, can be negative), k2 = (log r)^2 / 2, k3 = (r' - 1) - log r' with
    r' = p_ref / p (unbiased and never negative); r = p / p_ref (Schulman, "Approximating KL").
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row (responses are never empty: a response holds at least one token)."""
    return (mask.sum(1) - 1).clamp(min=0).long()


def kl_penalised_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float, estimator: KLEstimator = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * KL on every response token, plus the sequence score on the last one.

    Returns (rewards [B, T], kl [B, T]), both zero on padding.
    """
    kl = kl_estimate(logp, ref_logp, estimator) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(score.shape[0], device=score.device)
    rewards[rows, last_token_index(mask)] += score.to(rewards.dtype)
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each response; the value after the last token is 0.

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  returns = A + V.
    """
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        running = running * mask[:, t]  # padding after EOS: no reward, no value, nothing flows back
        adv[:, t] = running
    return adv, (adv + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2, is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate, token-averaged: mean(max(-A r, -A clip(r, 1-eps, 1+eps))), each token's term
    times its ``is_weights`` (the rollout correction of :func:`truncated_is_weights`) when given.

    Also returns the clip fraction and the approximate KL (k3) between the old and new policy.
    """
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    surrogate = torch.maximum(unclipped, clipped)
    loss = masked_mean(surrogate if is_weights is None else surrogate * is_weights, mask)
    with torch.no_grad():
        stats = {"clip_frac": masked_mean((clipped > unclipped).float(), mask),
                 "approx_kl": masked_mean(kl_estimate(old_logp, logp, "k3"), mask)}
    return loss, stats


def truncated_is_weights(trainer_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                         cap: float | None) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Truncated importance sampling for a rollout engine that is not the trainer (vLLM): the tokens were
    drawn from the engine's p_rollout, the PPO ratio uses the trainer's p_old of the same weights, and
    the two never agree exactly (kernels, precision). Each token's policy-loss term is weighted by
    min(p_old / p_rollout, cap), with no gradient (Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"); ``cap`` None: no weights (None), only the statistics.

    Returns (weights [B, T] or None, statistics over the masked tokens: mean |log p_old - log p_rollout|,
    the largest ratio, the fraction of tokens whose ratio the cap truncated)."""
    with torch.no_grad():
        log_ratio = (trainer_logp - rollout_logp) * mask
        ratio = log_ratio.exp()
        tokens = mask.bool()
        stats = {"rollout_logp_abs_diff": masked_mean(log_ratio.abs(), mask).item(),
                 "rollout_is_ratio_max": ratio[tokens].max().item() if tokens.any() else 1.0,
                 "rollout_is_clip_frac": 0.0 if cap is None else masked_mean((ratio > cap).float(), mask).item()}
        weights = None if cap is None else ratio.clamp(max=cap) * mask
    return weights, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * mean(max((V - R)^2, (clip(V, V_old +- eps) - R)^2)); without clip the plain squared error."""
    err = (values - returns) ** 2
    if clip is None:
        return 0.5 * masked_mean(err, mask), {"vf_clip_frac": torch.zeros(())}
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        frac = masked_mean((err_clipped > err).float(), mask)
    return loss, {"vf_clip_frac": frac}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R): 1 is a perfect critic, 0 no better than a constant."""
    var_r = masked_var(returns, mask)
    if var_r <= 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask) / var_r)


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: (score - group mean) / group std, for consecutive groups of ``group_size`` samples of a prompt."""
    g = scores.view(-1, group_size)
    adv = g - g.mean(1, keepdim=True)
    if scale:
        adv = adv / (g.std(1, keepdim=True) + eps)
    return adv.reshape(-1)


def leave_one_out_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: score minus the mean score of the other samples of the same prompt."""
    if group_size < 2:
        raise ValueError("the leave-one-out baseline needs at least 2 samples per prompt")
    g = scores.view(-1, group_size)
    baseline = (g.sum(1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


def negative_kl_streak(streak: int, kl: float, patience: int) -> tuple[int, bool]:
    """Count consecutive steps whose mean KL estimate is negative; the flag is True when the streak
    reaches ``patience`` (once per streak). A persistently negative KL(policy || reference) of
    sampled tokens means the log-probabilities do not match the sampler (temperature, top-k/top-p)."""
    streak = streak + 1 if kl < 0 else 0
    return streak, streak == patience


class KLController:
    """KL coefficient: fixed, or adapted towards a target KL (Ziegler et al. 2019).

    Adaptive rule per rollout: e = clip(KL / target - 1, -0.2, 0.2); coef *= 1 + e * n / horizon,
    where n is the number of samples in the rollout.
    """

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10_000):
        self.coef = coef
        self.target = target
        self.horizon = horizon

    def update(self, kl: float, n_samples: int) -> None:
        if self.target is None or not math.isfinite(kl):
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_samples / self.horizon

    def state_dict(self) -> dict:
        return {"coef": self.coef, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.coef, self.target, self.horizon = state["coef"], state["target"], state["horizon"]
