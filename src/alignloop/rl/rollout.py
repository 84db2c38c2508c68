"""Rollouts: batched sampling from the policy, and log-probabilities of what was sampled.

Prompts are left-padded so every row's next token lands in the same column and the KV cache
serves the whole batch; responses are right-padded after their first EOS. Positions come from
the attention mask, so a padded row computes exactly what it would alone.

The log-probabilities use ``logits / temperature`` - the distribution the sampler drew from - or
the PPO ratio starts away from 1 and the KL estimate is biased (often negative).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from alignloop.models.forward import selected_next_token_logits
from alignloop.rl.ppo_math import logprobs_from_logits


@dataclass
class SamplingSettings:
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # False keeps sampling to max_new_tokens (fixed-length benchmarks); the response still ends at its
    # first EOS for scoring and for every loss.
    stop_on_eos: bool = True


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    response_ids: torch.Tensor  # [B, R] right-padded after the first EOS
    response_mask: torch.Tensor  # [B, R] 1 on generated tokens up to and including the first EOS
    ended: torch.Tensor  # [B] bool: the response contains EOS
    logprobs: torch.Tensor | None = None  # [B, R] from the generation pass itself, 0 on padding

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def select(self, rows: torch.Tensor | list[int]) -> Rollout:
        rows = torch.as_tensor(rows, dtype=torch.long)
        return Rollout(*(None if t is None else t[rows] for t in
                         (self.prompt_ids, self.prompt_mask, self.response_ids, self.response_mask, self.ended,
                          self.logprobs)))


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.as_tensor(list(s))
            mask[i, width - len(s):] = 1
    return ids, mask


def mask_after_eos(tokens: torch.Tensor, eos_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, R] that is 1 up to and including the first EOS, ended [B])."""
    if eos_id is None:
        return torch.ones_like(tokens), torch.zeros(tokens.shape[0], dtype=torch.bool)
    is_eos = tokens == eos_id
    before = torch.cumsum(is_eos.long(), 1) - is_eos.long()  # EOS seen strictly before this position
    return (before == 0).long(), is_eos.any(1)


def sequence_inputs(r: Rollout) -> dict[str, torch.Tensor]:
    """Model inputs for prompt + response, and ``select`` [B, L-1]: positions whose next token is a
    response token (so logits/values come out in the row-major order of ``response_mask``)."""
    input_ids = torch.cat([r.prompt_ids, r.response_ids], 1)
    attention_mask = torch.cat([r.prompt_mask, r.response_mask], 1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    P = r.prompt_ids.shape[1]
    select = torch.zeros_like(attention_mask[:, :-1], dtype=torch.bool)
    select[:, P - 1:] = r.response_mask.bool()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "select": select}


def scatter_response(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Flat per-token values [N] (row-major over response_mask) back to [B, R], 0 on padding."""
    out = torch.zeros(response_mask.shape, dtype=values.dtype, device=values.device)
    out[response_mask.bool()] = values
    return out


def response_logits(model: nn.Module, r: Rollout) -> torch.Tensor:
    """Logits [N, vocab] at the N response tokens only; prompt and padding never reach the LM head."""
    x = sequence_inputs(r)
    return selected_next_token_logits(model, x["input_ids"], x["select"], x["attention_mask"], x["position_ids"])


def response_logprobs(model: nn.Module, r: Rollout, temperature: float) -> torch.Tensor:
    logits = response_logits(model, r)
    return scatter_response(logprobs_from_logits(logits, r.response_ids[r.response_mask.bool()], temperature),
                            r.response_mask)


def generation_config(s: SamplingSettings, eos_id: int | None, pad_id: int, output_logits: bool = False):
    """A complete config so nothing is inherited from the checkpoint's generation_config (a stray
    min_length, repetition penalty or top_k=50 would change the sampling distribution or suppress EOS)."""
    from transformers import GenerationConfig

    # top_k=0 must be explicit: transformers fills an unset top_k with 50.
    return GenerationConfig(do_sample=True, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                            max_new_tokens=s.max_new_tokens, min_new_tokens=0, repetition_penalty=1.0,
                            eos_token_id=eos_id if s.stop_on_eos else None,
                            pad_token_id=pad_id, use_cache=True, num_beams=1, return_dict_in_generate=True,
                            output_logits=output_logits)


@contextlib.contextmanager
def clean_generation_defaults(model: nn.Module):
    """transformers fills every unset generation setting from the checkpoint's generation_config
    (suppress_tokens, bad_words_ids, eos ids...); swap in a blank one while we sample."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


@torch.no_grad()
def generate(model: nn.Module, prompts: Sequence[Sequence[int]], s: SamplingSettings, eos_id: int, pad_id: int,
             batch_size: int | None = None, keep_logprobs: bool = True) -> Rollout:
    """Sample one response per prompt (repeat a prompt in ``prompts`` for several samples).

    With ``keep_logprobs`` the log-probabilities are taken from the generation pass's own logits,
    which saves a full policy forward per rollout.
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    cfg = generation_config(s, eos_id, pad_id, keep_logprobs)
    batch_size = batch_size or len(prompts)
    chunks, logps = [], []
    for i in range(0, len(prompts), batch_size):
        ids, mask = prompt_ids[i: i + batch_size].to(device), prompt_mask[i: i + batch_size].to(device)
        with clean_generation_defaults(model):
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
        new = out.sequences[:, ids.shape[1]:]
        chunks.append(new.cpu())
        if keep_logprobs:
            logits = torch.stack(out.logits, 1)
            logps.append(logprobs_from_logits(logits, new, s.temperature).cpu())
    width = max(c.shape[1] for c in chunks)
    response_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    logprobs = torch.zeros((len(prompts), width)) if keep_logprobs else None
    row = 0
    for k, c in enumerate(chunks):
        response_ids[row: row + c.shape[0], : c.shape[1]] = c
        if logprobs is not None:
            logprobs[row: row + c.shape[0], : c.shape[1]] = logps[k]
        row += c.shape[0]
    response_mask, ended = mask_after_eos(response_ids, eos_id)
    if logprobs is not None:
        logprobs = logprobs * response_mask
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, ended, logprobs)
