"""Optimizer, learning-rate schedule and the optimizer step, shared by every loop.

The caller runs ``accelerator.backward`` once per micro-batch; ``optimizer_step`` then clips through the
accelerator (which unscales fp16 gradients first), checks the gradient norms, steps the optimizer and the
schedule and clears the gradients.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from alignloop.config import TrainConfig
from alignloop.training.divergence import DivergenceCheck


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 lr: float | None = None) -> list[dict]:
    """AdamW parameter groups of the trainable parameters; biases and norm weights (1-D tensors) are exempt
    from weight decay. ``lr`` gives the groups their own learning rate (a critic's), else the optimizer's."""
    trainable = [p for _, p in named if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    if lr is not None:
        for g in groups:
            g["lr"] = lr
    return [g for g in groups if g["params"]]


def build_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``groups``, its moments already allocated (``allocate_state``)."""
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, foreach=True)
    allocate_state(optimizer)
    return optimizer


def allocate_state(optimizer: torch.optim.AdamW) -> None:
    """Give every parameter its AdamW state now, as the first step would (zero moments, step 0), by stepping
    once at learning rate 0 on zero gradients, which changes no weight.

    PyTorch allocates the moments lazily, in the first step, where they land in the holes that step's
    activations left in the heap; glibc never hands those back, and moments scattered through them make
    every later step's activations extend the heap instead (peak RSS, measured in bench/README.md). Made
    before the first forward, they sit beside the weights."""
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    for state in optimizer.state.values():
        state["step"].zero_()
    optimizer.zero_grad(set_to_none=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    if cfg.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    if cfg.schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)


def set_base_lrs(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                 base_lrs: Sequence[float]) -> None:
    """Give each parameter group a new peak learning rate and put its current one where the schedule says
    at the current step (a resumed run whose config changed ``lr``)."""
    for group, base, factor in zip(optimizer.param_groups, base_lrs, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler.base_lrs = list(base_lrs)


def optimizer_step(acc, optimizer: torch.optim.Optimizer, scheduler, clip: Sequence[Iterable[nn.Parameter]],
                   max_norm: float | None, divergence: DivergenceCheck, step: int) -> list[float | None]:
    """Clip each parameter set in ``clip`` to ``max_norm`` on its own (None: measure without clipping), stop on
    a non-finite norm, then step. Returns the norms before clipping, one per set (None where the backend
    does not report it, e.g. DeepSpeed)."""
    norms: list[float | None] = []
    for i, params in enumerate(clip):
        # The accelerator unscales fp16 gradients of the whole optimizer in its first clip call, and the
        # gradient scaler refuses to unscale twice in one step: the other sets are clipped directly.
        clip_fn = acc.clip_grad_norm_ if i == 0 else torch.nn.utils.clip_grad_norm_
        norm = clip_fn(params, math.inf if max_norm is None else max_norm)
        norms.append(None if norm is None else float(norm))
    for norm in norms:
        if norm is not None:
            divergence.check(norm, step, "the gradient norm")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norms
