"""The Sampler interface and its transformers backend, plus the per-token sampling of serve's engine.

A sampler turns token-id prompts into a :class:`Rollout` under one :class:`SamplingConfig`. The
transformers backend runs our own decode loop (alignloop.generation.decode) on left-padded batches with
the KV cache; it never reads the checkpoint's generation_config (a stray min_new_tokens, repetition
penalty, suppressed EOS or top_k=50 would change what is sampled), and every stop id (EOS and the chat
template's end-of-turn token: data.tokenize.stop_token_ids) ends a response.
A vLLM backend fills the same interface (alignloop.generation.vllm).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from alignloop.config import SamplingConfig
from alignloop.data.batching import left_pad
from alignloop.generation.decode import decode, sample_tokens
from alignloop.generation.rollout import Rollout, assemble_rollout


class Sampler(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, repeat: int = 1,
                 keep_logprobs: bool = False, desc: str | None = None) -> Rollout:
        """``repeat`` samples of every prompt, in ``repeat`` contiguous rows per prompt (row order:
        prompt 0's samples, then prompt 1's...). All prompts are left-padded to the longest of them;
        ``sampling.batch_size`` prompts (with their samples) go into one generation call. ``keep_logprobs``: per-token log-probabilities under the sampling
        temperature. ``desc`` names a progress bar over the calls."""
        ...


def inference_device() -> torch.device:
    """Where a stage that only generates (collect, predict, eval) puts its model: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TransformersSampler:
    """Our decode loop (alignloop.generation.decode) on left-padded batches of a transformers model. The
    caller seeds torch's RNG; draws follow the row order of the rows still running, so the same seed,
    prompts and settings give the same tokens in every stage."""

    def __init__(self, model: nn.Module, stop_ids: Sequence[int], pad_id: int) -> None:
        self.model = model
        self.stop_ids = list(stop_ids)
        self.pad_id = pad_id

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, repeat: int = 1,
                 keep_logprobs: bool = False, desc: str | None = None) -> Rollout:
        if keep_logprobs and sampling.temperature <= 0:
            raise ValueError("log-probabilities need a sampling temperature > 0")
        rows = [p for p in prompts for _ in range(repeat)]
        # One width for the whole call (what the rollout returns); calls are cut from it row-wise.
        prompt_ids, prompt_mask = left_pad(rows, self.pad_id)
        device = next(self.model.parameters()).device
        per_call = (sampling.batch_size or len(prompts)) * repeat
        chunks, logps = [], []
        for i in tqdm(range(0, len(rows), per_call), desc=desc, unit="batch", disable=desc is None, leave=False):
            ids, mask = prompt_ids[i: i + per_call].to(device), prompt_mask[i: i + per_call].to(device)
            new, logp = decode(self.model, ids, mask, sampling, self.stop_ids, self.pad_id, keep_logprobs)
            chunks.append(new.cpu())
            if logp is not None:
                logps.append(logp.cpu())
        return assemble_rollout(prompt_ids, prompt_mask, chunks, logps if keep_logprobs else None, self.pad_id,
                                self.stop_ids)


def sample_next_token(logits: torch.Tensor, s: SamplingConfig, generator: torch.Generator | None) -> int:
    """One token from one row of next-token logits [V] (serve's engine samples row by row, each request
    with its own settings and seeded generator): decode.sample_tokens on a batch of one."""
    return int(sample_tokens(logits[None], s, generator)[0])
