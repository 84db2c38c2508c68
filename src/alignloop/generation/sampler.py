"""The Sampler interface and its transformers backend, plus the per-token sampling of serve's engine.

A sampler turns token-id prompts into a :class:`Rollout` under one :class:`SamplingConfig`. The
transformers backend runs our own decode loop (alignloop.generation.decode) on left-padded batches with
the KV cache; it never reads the checkpoint's generation_config (a stray min_new_tokens, repetition
penalty, suppressed EOS or top_k=50 would change what is sampled), and every stop id (EOS and the chat
template's end-of-turn token: data.tokenize.stop_token_ids) ends a response.
A vLLM backend fills the same interface (alignloop.generation.vllm).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from alignloop.config import SamplingConfig
from alignloop.data.batching import left_pad
from alignloop.generation.decode import decode, onednn_packed_linears, sample_tokens
from alignloop.generation.rollout import Rollout, assemble_rollout
from alignloop.generation.vllm import full_tensor
from alignloop.models.precision import bound_onednn_kernel_caches


class Sampler(Protocol):
    # True where the sampler decodes apart from the model under its caller's autocast (its own weights or
    # precision): its log-probs are not a trainer's, and load_weights pushes the model's after a change.
    own_numerics: bool

    def load_weights(self, model: nn.Module) -> None: ...

    def sleep(self) -> None: ...

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
    prompts and settings give the same tokens in every stage.

    ``dtype`` None: ``model`` itself decodes, under whatever autocast the caller holds. A dtype: decoding
    runs with autocast off on a copy of ``model`` in that dtype (``model`` itself where its weights
    already are in it), made now; a caller that changes the model's weights afterwards (PPO) pushes them
    again with ``load_weights``."""

    def __init__(self, model: nn.Module, stop_ids: Sequence[int], pad_id: int,
                 dtype: torch.dtype | None = None) -> None:
        self.stop_ids = list(stop_ids)
        self.pad_id = pad_id
        self.dtype = dtype
        self.model = model
        if dtype is not None and next(model.parameters()).dtype != dtype:
            self.model = copy.deepcopy(model).to(dtype)
        if dtype == torch.bfloat16:
            bound_onednn_kernel_caches()  # decoding brings a new matmul shape at every step

    @property
    def own_numerics(self) -> bool:
        return self.dtype is not None

    @torch.no_grad()
    def load_weights(self, model: nn.Module) -> None:
        """``model``'s current weights into the copy that decodes (FSDP2 shards gathered); nothing to do
        where ``model`` decodes itself."""
        if self.model is model:
            return
        mine, theirs = self.model.named_parameters(), model.named_parameters()
        for (name, dst), (other, src) in zip(mine, theirs, strict=True):
            if name != other:
                raise ValueError(f"the sampler's copy has {name} where the model has {other}")
            dst.copy_(full_tensor(src.detach()))

    def sleep(self) -> None:
        """Nothing to free between rollouts (the vLLM sampler frees its GPU memory)."""

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
        # with a dtype of its own the sampler decodes in exactly that, whatever autocast the caller holds
        precision = contextlib.nullcontext() if self.dtype is None else torch.autocast(device.type, enabled=False)
        chunks, logps = [], []
        # the weights stay as they are for the whole call: one packed copy serves every batch of it
        with precision, onednn_packed_linears(self.model, min(per_call, len(rows))):
            for i in tqdm(range(0, len(rows), per_call), desc=desc, unit="batch", disable=desc is None,
                          leave=False):
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
