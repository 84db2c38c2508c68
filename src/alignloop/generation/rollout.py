"""What a sampler returns, and the log-probabilities of what was sampled.

Prompts are left-padded so every row's next token lands in the same column and the KV cache serves
the whole batch; responses are right-padded after their first stop token (EOS, or the chat template's
end-of-turn token; "EOS" below means any of them). Positions come from the attention
mask, so a padded row computes exactly what it would alone.

The log-probabilities use ``logits / temperature`` - the distribution the sampler drew from - or the
PPO ratio starts away from 1 and the KL estimate is biased (often negative).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from alignloop.data.batching import position_ids
from alignloop.models.forward import selected_next_token_logits, shared_prompt_next_token_logits
from alignloop.models.token_logprobs import token_logprobs


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
        """The given rows, without the prompt columns that are padding in all of them: prompts are left-padded
        to the batch's longest, and a forward over a group of short prompts need not run over that padding.
        The response columns stay as they are, so [rows, R] tensors of the whole rollout still line up."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        prompt_mask = self.prompt_mask[rows]
        # Positions come from the attention mask, so dropping columns masked in every row changes no number.
        used = prompt_mask.any(0).nonzero()
        first = int(used[0]) if len(used) else 0
        return Rollout(self.prompt_ids[rows, first:], prompt_mask[:, first:],
                       *(None if t is None else t[rows] for t in
                         (self.response_ids, self.response_mask, self.ended, self.logprobs)))

    def lengths(self) -> list[int]:
        """Tokens per row, prompt and response, padding excluded."""
        return (self.prompt_mask.sum(1) + self.response_mask.sum(1)).tolist()


def mask_after_eos(tokens: torch.Tensor, stop_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, R] that is 1 up to and including the first of any stop id, ended [B]: a stop id occurs)."""
    if not stop_ids:
        return torch.ones_like(tokens), torch.zeros(tokens.shape[0], dtype=torch.bool)
    is_eos = torch.isin(tokens, torch.tensor(list(stop_ids), dtype=tokens.dtype, device=tokens.device))
    before = torch.cumsum(is_eos.long(), 1) - is_eos.long()  # EOS seen strictly before this position
    return (before == 0).long(), is_eos.any(1)


def assemble_rollout(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, pieces: Sequence[torch.Tensor],
                     logprob_pieces: Sequence[torch.Tensor] | None, pad_id: int, stop_ids: Sequence[int]) -> Rollout:
    """Responses generated in consecutive pieces of rows ([n_k, width_k] each, right-padded with pad_id; with
    their log-probs) as one Rollout over all rows: padded to the widest piece, cut after the first stop id."""
    width = max(p.shape[1] for p in pieces)
    response_ids = torch.full((prompt_ids.shape[0], width), pad_id, dtype=torch.long)
    logprobs = None if logprob_pieces is None else torch.zeros((prompt_ids.shape[0], width))
    row = 0
    for k, piece in enumerate(pieces):
        response_ids[row: row + piece.shape[0], : piece.shape[1]] = piece
        if logprobs is not None:
            logprobs[row: row + piece.shape[0], : piece.shape[1]] = logprob_pieces[k]
        row += piece.shape[0]
    response_mask, ended = mask_after_eos(response_ids, stop_ids)
    if logprobs is not None:
        logprobs = logprobs * response_mask
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, ended, logprobs)


def sequence_inputs(r: Rollout) -> dict[str, torch.Tensor]:
    """Model inputs for prompt + response, and ``select`` [B, L-1]: positions whose next token is a
    response token (so logits/values come out in the row-major order of ``response_mask``)."""
    input_ids = torch.cat([r.prompt_ids, r.response_ids], 1)
    attention_mask = torch.cat([r.prompt_mask, r.response_mask], 1)
    P = r.prompt_ids.shape[1]
    select = torch.zeros_like(attention_mask[:, :-1], dtype=torch.bool)
    select[:, P - 1:] = r.response_mask.bool()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids(attention_mask),
            "select": select}


def scatter_response(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Flat per-token values [N] (row-major over response_mask) back to [B, R], 0 on padding."""
    out = torch.zeros(response_mask.shape, dtype=values.dtype, device=values.device)
    out[response_mask.bool()] = values
    return out


def response_logits(model: nn.Module, r: Rollout) -> torch.Tensor:
    """Logits [N, vocab] at the N response tokens only; prompt and padding never reach the LM head. Rows
    that repeat a prompt run it once (models.forward.shared_prompt_next_token_logits)."""
    shared = shared_prompt_next_token_logits(model, r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask)
    if shared is not None:
        return shared
    x = sequence_inputs(r)
    return selected_next_token_logits(model, x["input_ids"], x["select"], x["attention_mask"], x["position_ids"])


def response_logprobs(model: nn.Module, r: Rollout, temperature: float) -> torch.Tensor:
    logits = response_logits(model, r)
    return scatter_response(token_logprobs(logits, r.response_ids[r.response_mask.bool()], temperature),
                            r.response_mask)
