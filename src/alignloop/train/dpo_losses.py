"""Direct preference objectives as pure functions of sequence log-probabilities (no model, no batching).

Notation, per pair: ``pc``, ``pr`` are the policy's log-probabilities of the chosen and rejected response
(summed over the response's tokens, prompt and padding excluded), ``rc``, ``rr`` the reference model's,
``nc``, ``nr`` the responses' token counts. Every function returns one loss per pair (or per example for
KTO); the stage averages them over its units.

    z = (pc - rc) - (pr - rr)                     the DPO log-ratio difference ("logits")
    r = beta * (p - ref)                          a response's implicit reward

Defaults and conventions follow TRL's trainers (DPO, CPO for SimPO, ORPO, KTO), so a config moved from
there trains the same objective.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo", "hinge", "label_smoothing", "robust", "simpo", "orpo", "kto")
# Losses that need no reference model (none is loaded for them).
REFERENCE_FREE = frozenset({"simpo", "orpo"})
# Losses on length-normalised (per-token mean) log-probabilities.
LENGTH_NORMALISED = frozenset({"ipo", "simpo", "orpo"})


def dpo_logits(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
    """z = (pc - rc) - (pr - rr): how much more the policy prefers chosen over rejected than the reference."""
    return (pc - rc) - (pr - rr)


def implicit_reward(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """r = beta * (log pi(y|x) - log pi_ref(y|x)), DPO's reward of a response."""
    return beta * (policy - reference)


def sigmoid_loss(z: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * z)."""
    return -F.logsigmoid(beta * z)


def label_smoothing_loss(z: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """Conservative DPO (cDPO, Mitchell 2023): each label is wrong with probability ``eps``, so the target
    is a soft one: -(1 - eps) * log sigmoid(beta z) - eps * log sigmoid(-beta z). eps = 0 is DPO."""
    return -(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z)


def robust_loss(z: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024): an unbiased loss under label flips with rate ``eps`` < 0.5:
    (-(1 - eps) * log sigmoid(beta z) + eps * log sigmoid(-beta z)) / (1 - 2 eps). eps = 0 is DPO."""
    return (-(1 - eps) * F.logsigmoid(beta * z) + eps * F.logsigmoid(-beta * z)) / (1 - 2 * eps)


def ipo_loss(z: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023): (z - 1 / (2 beta))^2, a squared loss that keeps z from running off to infinity
    on deterministic preferences. As in TRL, z is built from per-token mean log-probabilities."""
    return (z - 1 / (2 * beta)) ** 2


def hinge_loss(z: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC-HF's calibration loss (Zhao et al. 2023) on the DPO log-ratio: max(0, 1 - beta * z)."""
    return torch.relu(1 - beta * z)


def simpo_loss(avg_c: torch.Tensor, avg_r: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimPO (Meng et al. 2024), reference-free: -log sigmoid(beta * (avg_c - avg_r) - gamma), where avg_* are
    per-token mean log-probabilities and gamma is the target reward margin."""
    return -F.logsigmoid(beta * (avg_c - avg_r) - gamma)


def log_odds(avg: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of p = exp(avg), a per-token mean log-probability (< 0)."""
    # log(1 - exp(a)) as log(-expm1(a)): exact near a = 0, where 1 - exp(a) cancels.
    return avg - torch.log(-torch.expm1(avg))


def orpo_loss(avg_c: torch.Tensor, avg_r: torch.Tensor, lam: float) -> torch.Tensor:
    """ORPO (Hong et al. 2024), reference-free: the chosen response's NLL plus an odds-ratio term,
    -avg_c - lam * log sigmoid(log_odds(avg_c) - log_odds(avg_r)) (TRL's ``beta`` is lam)."""
    return -avg_c - lam * F.logsigmoid(log_odds(avg_c) - log_odds(avg_r))


def kto_reference_point(policy_kl: torch.Tensor, reference_kl: torch.Tensor,
                        mean: Callable[[torch.Tensor], torch.Tensor] = torch.mean) -> torch.Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024): the batch's estimate of KL(pi || pi_ref),
    mean(log pi - log pi_ref) over *mismatched* (prompt, response) pairs, clamped at 0 and detached (no
    gradient flows through it). ``mean`` averages the differences: on several processes the mean over every
    process's pairs (the global batch, as TRL does)."""
    return mean(policy_kl - reference_kl).clamp(min=0).detach()


def kto_loss(logratio: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO per example, with logratio = log pi(y|x) - log pi_ref(y|x):
    desirable:   desirable_weight   * (1 - sigmoid(beta * (logratio - z0)))
    undesirable: undesirable_weight * (1 - sigmoid(beta * (z0 - logratio)))"""
    sign = desirable.to(logratio.dtype) * 2 - 1  # +1 desirable, -1 undesirable
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(logratio.dtype)
    return weight * (1 - torch.sigmoid(beta * sign * (logratio - z0)))


def sft_loss(avg_c: torch.Tensor) -> torch.Tensor:
    """The chosen response's NLL per token, -avg_c: the optional SFT term (RPO, TRL's ``rpo_alpha``)."""
    return -avg_c


def pair_loss(loss: str, pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor | None, rr: torch.Tensor | None,
              nc: torch.Tensor, nr: torch.Tensor, beta: float, label_smoothing: float = 0.0,
              gamma: float = 0.5) -> torch.Tensor:
    """The configured pairwise loss per pair (``rc``/``rr`` are None for reference-free losses)."""
    avg_c, avg_r = pc / nc, pr / nr
    if loss == "simpo":
        return simpo_loss(avg_c, avg_r, beta, gamma)
    if loss == "orpo":
        return orpo_loss(avg_c, avg_r, beta)
    if loss == "ipo":
        return ipo_loss(dpo_logits(avg_c, avg_r, rc / nc, rr / nr), beta)
    z = dpo_logits(pc, pr, rc, rr)
    if loss == "sigmoid":
        return sigmoid_loss(z, beta)
    if loss == "hinge":
        return hinge_loss(z, beta)
    if loss == "label_smoothing":
        return label_smoothing_loss(z, beta, label_smoothing)
    if loss == "robust":
        return robust_loss(z, beta, label_smoothing)
    raise ValueError(f"unknown pairwise loss {loss!r}")
