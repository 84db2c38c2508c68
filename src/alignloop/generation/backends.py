"""The sampler a stage gets for its ``generation.backend``: the one construction point of ppo, collect,
eval and predict (serve picks its engine with --engine)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from alignloop.config import SamplingConfig
from alignloop.generation.sampler import Sampler, TransformersSampler
from alignloop.generation.vllm import VLLMSampler


def make_sampler(model: nn.Module, stop_ids: Sequence[int], pad_id: int, sampling: SamplingConfig) -> Sampler:
    """transformers: ``model`` samples itself. vllm: an in-process engine loaded with ``model``'s weights
    now; a caller that changes them afterwards (PPO) pushes them again with ``VLLMSampler.load_weights``."""
    if sampling.backend == "vllm":
        return VLLMSampler.for_model(model, stop_ids, pad_id, sampling.vllm)
    return TransformersSampler(model, stop_ids, pad_id)
