"""The sampler a stage gets for its ``generation.backend``: the one construction point of ppo, collect,
eval and predict (serve picks its engine with --engine), and the one resolution of ``generation.precision``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from alignloop.config import SamplingConfig
from alignloop.generation.sampler import Sampler, TransformersSampler
from alignloop.generation.vllm import VLLMSampler
from alignloop.models.precision import bf16_pays_on_cpu

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sampling_dtype(model: nn.Module, precision: str, trainer_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype the transformers sampler decodes ``model`` in under ``generation.precision``; None: the
    model as it is, under its caller's autocast. ``trainer_dtype``: what a training caller (PPO) computes
    in under its autocast (float32 without one), None for an inference-only stage."""
    if precision == "auto":
        if trainer_dtype is not None:
            return None
        weights = next(model.parameters())
        on_cpu_fp32 = weights.device.type == "cpu" and weights.dtype == torch.float32
        return torch.bfloat16 if on_cpu_fp32 and bf16_pays_on_cpu(model) else None
    wanted = PRECISION_DTYPES[precision]
    # The model as it is decodes exactly in ``wanted`` only where its weights are in it and no trainer's
    # autocast computes otherwise; a bf16 autocast over fp32 weights is not bf16 weights (and recasts frozen ones).
    return None if wanted == next(model.parameters()).dtype and trainer_dtype in (None, wanted) else wanted


def make_sampler(model: nn.Module, stop_ids: Sequence[int], pad_id: int, sampling: SamplingConfig,
                 trainer_dtype: torch.dtype | None = None) -> Sampler:
    """transformers: ``model`` samples itself, or a copy of it in the precision of ``sampling_dtype``.
    vllm: an in-process engine loaded with ``model``'s weights now. A sampler with ``own_numerics`` (vLLM,
    or a precision of its own) may hold its own copy of the weights: a caller that changes them afterwards
    (PPO) pushes them again with ``load_weights``, and recomputes the log-probs it trains on."""
    if sampling.backend == "vllm":
        return VLLMSampler.for_model(model, stop_ids, pad_id, sampling.vllm)
    return TransformersSampler(model, stop_ids, pad_id, sampling_dtype(model, sampling.precision, trainer_dtype))
