"""The Sampler interface and its transformers backend, plus the per-token sampling of serve's engine.

A sampler turns token-id prompts into a :class:`Rollout` under one :class:`SamplingConfig`. The
transformers backend runs ``model.generate`` on left-padded batches with the KV cache and a complete
generation config, so nothing is inherited from the checkpoint's generation_config (a stray
min_new_tokens, repetition penalty, suppressed EOS or top_k=50 would change what is sampled), and every
stop id (EOS and the chat template's end-of-turn token: data.tokenize.stop_token_ids) ends a response.
A vLLM backend fills the same interface (alignloop.generation.vllm).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig

from alignloop.config import SamplingConfig
from alignloop.data.batching import left_pad
from alignloop.generation.rollout import Rollout, logprobs_from_logits, mask_after_eos


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


def generation_config(s: SamplingConfig, stop_ids: Sequence[int], pad_id: int, output_logits: bool = False):
    """A complete config: every setting that changes what is sampled is set here, nothing is left for
    transformers to fill from the checkpoint. Temperature 0 is greedy decoding."""
    # top_k=0 must be explicit: transformers fills an unset top_k with 50.
    sampling = dict(do_sample=True, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p) if s.temperature > 0 \
        else dict(do_sample=False)
    return GenerationConfig(**sampling, max_new_tokens=s.max_new_tokens, min_new_tokens=0, repetition_penalty=1.0,
                            eos_token_id=list(stop_ids) if s.stop_on_eos and stop_ids else None,
                            pad_token_id=pad_id, use_cache=True, num_beams=1, return_dict_in_generate=True,
                            output_logits=output_logits)


@contextlib.contextmanager
def clean_generation_defaults(model: nn.Module) -> Iterator[None]:
    """transformers fills every unset generation setting from the checkpoint's generation_config
    (suppress_tokens, bad_words_ids, eos ids...); swap in a blank one while we sample."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


class TransformersSampler:
    """``model.generate`` on left-padded batches (see the module docstring). The caller seeds torch's RNG;
    draws follow the row order, so the same seed, prompts and settings give the same tokens in every stage."""

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
        cfg = generation_config(sampling, self.stop_ids, self.pad_id, keep_logprobs)
        per_call = (sampling.batch_size or len(prompts)) * repeat
        chunks, logps = [], []
        for i in tqdm(range(0, len(rows), per_call), desc=desc, unit="batch", disable=desc is None, leave=False):
            ids, mask = prompt_ids[i: i + per_call].to(device), prompt_mask[i: i + per_call].to(device)
            with clean_generation_defaults(self.model):
                out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
            new = out.sequences[:, ids.shape[1]:]
            chunks.append(new.cpu())
            if keep_logprobs:
                logits = torch.stack(out.logits, 1)
                logps.append(logprobs_from_logits(logits, new, sampling.temperature).cpu())
        width = max(c.shape[1] for c in chunks)
        response_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        logprobs = torch.zeros((len(rows), width)) if keep_logprobs else None
        row = 0
        for k, c in enumerate(chunks):
            response_ids[row: row + c.shape[0], : c.shape[1]] = c
            if logprobs is not None:
                logprobs[row: row + c.shape[0], : c.shape[1]] = logps[k]
            row += c.shape[0]
        response_mask, ended = mask_after_eos(response_ids, self.stop_ids)
        if logprobs is not None:
            logprobs = logprobs * response_mask
        return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, ended, logprobs)


# Temperatures below this sample greedily in sample_next_token.
GREEDY_BELOW_TEMPERATURE = 1e-5


def sample_next_token(logits: torch.Tensor, s: SamplingConfig, generator: torch.Generator | None) -> int:
    """One token from one row of next-token logits [V] (serve's engine samples row by row, each request
    with its own settings and seeded generator): greedy at temperature 0, otherwise softmax(logits / T)
    cut to the top-k tokens, then to the smallest prefix whose mass reaches top-p. A temperature below
    GREEDY_BELOW_TEMPERATURE is greedy too (as in vLLM): logits / T would overflow into inf and nan."""
    if s.temperature < GREEDY_BELOW_TEMPERATURE:
        return int(logits.argmax())
    probs = F.softmax(logits.float() / s.temperature, dim=-1)
    if 0 < s.top_k < probs.shape[-1]:
        probs = probs.masked_fill(probs < probs.topk(s.top_k).values[-1], 0.0)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(0) - sorted_p >= s.top_p
        drop[0] = False  # the top token always stays, even for a top-p that is 0 in float32
        probs = probs.scatter(0, order[drop], 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))
