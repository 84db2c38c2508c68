"""Causal-LM forward passes that compute the vocabulary projection only where it is needed.

The output projection is a large share of a small model's compute (vocab x hidden per token)
and its logits dominate activation memory. SFT needs it only at completion tokens and PPO only
at response tokens, so we run the transformer body once and project just the selected
positions. Wrapped models (DDP, FSDP) and heads that post-process logits take the plain path.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

from alignloop.data.batching import distinct_rows, position_ids
from alignloop.models.attention import SDPA_IMPLEMENTATIONS
from alignloop.models.token_logprobs import token_logprobs

IGNORE = -100


def is_parallel_wrapped(model: nn.Module) -> bool:
    """DDP and FSDP modules: their own forward synchronises gradients (DDP) or gathers the sharded parameters
    (FSDP), so their parts must not run apart."""
    return isinstance(model, (nn.parallel.DistributedDataParallel, FSDPModule))


@functools.cache
def forward_parameters(model_class: type) -> frozenset[str]:
    """The keyword names a model class's forward takes (read once per class: serve asks at every decode step)."""
    return frozenset(inspect.signature(model_class.forward).parameters)


@functools.cache
def last_position_index(device: torch.device) -> torch.Tensor:
    """``tensor([-1])`` on ``device``, made once: serve's engine asks at every decode step, and on a GPU a new
    tensor would be a host-to-device copy each time."""
    return torch.tensor([-1], device=device)


def cached_forward_kwargs(model: nn.Module, cache: object, last_position_only: bool = True) -> dict[str, object]:
    """Keyword arguments for a forward pass that reads and extends the KV cache ``cache``, and (where the model
    takes it) projects only the last position to the vocabulary. transformers 5.20 renamed the forward's
    ``past_key_values`` to ``cache``; an unknown keyword is swallowed by ``**kwargs`` without a word, and the
    model then decodes without its history. A PEFT wrapper forwards to its base model's signature.

    The last position is kept by index, not as ``logits_to_keep=1``: transformers slices the hidden states with
    the int, and a prefill's [B, 1, H] slice of [B, P, H] is strided, so torch's matmul runs the vocabulary
    projection as a batched matmul over B expanded copies of the LM head's weight, over a thousand times slower
    than one matmul for SmolLM2 in bf16 on CPU (bench/README.md). Indexing gives a contiguous [B, 1, H]."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    accepted = forward_parameters(type(inner))
    out: dict[str, object] = {"cache" if "cache" in accepted else "past_key_values": cache, "use_cache": True}
    if last_position_only and "logits_to_keep" in accepted:
        out["logits_to_keep"] = last_position_index(next(model.parameters()).device)
    return out


def model_and_body(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The transformers model under a PEFT wrapper and its transformer body, for a forward run in parts; None
    for DDP / FSDP-wrapped models (their parts must not run apart) and models without a separate body."""
    if is_parallel_wrapped(model):
        return None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    return None if body is None or body is inner else (inner, body)


def body_and_lm_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The transformer body and the vocabulary projection of a causal LM, to run apart; None where the
    plain forward must run (DDP-wrapped models, heads that post-process logits, unknown layouts)."""
    parts = model_and_body(model)
    if parts is None:
        return None
    inner, body = parts
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    return None if head is None else (body, head)


def body_and_score_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The transformer body and the score head of a decoder's sequence classifier (transformers'
    ``*ForSequenceClassification`` of Llama, Qwen2, GPT-2, ...: a linear ``score`` on the last hidden states),
    to read scores at chosen positions; None where the plain forward must run (DDP / FSDP, encoders, whose
    ``classifier`` reads a pooled output, and unknown layouts)."""
    parts = model_and_body(model)
    if parts is None:
        return None
    inner, body = parts
    score = getattr(inner, "score", None)
    if score is None or not type(inner).__name__.endswith("ForSequenceClassification"):
        return None
    return body, score


def shares_prompt(model: nn.Module) -> bool:
    """Whether a prompt's responses can share one row: SDPA attention takes the custom boolean mask as it is
    (eager attention adds the mask to its scores and needs an additive one; flash attention takes none)."""
    return getattr(model.config, "_attn_implementation", None) in SDPA_IMPLEMENTATIONS


def selected_next_token_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    select: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [N, vocab] for the token after each position t with ``select[b, t]`` (select is [B, T-1])."""
    parts = body_and_lm_head(model)
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits
        return logits[:, :-1][select]
    body, head = parts
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=False).last_hidden_state
    return head(hidden[:, :-1][select])


def full_attention_cache(config: object) -> DynamicCache | None:
    """A fresh DynamicCache for a model of ``config`` whose every layer is full attention, else None (sliding
    windows and other layer kinds keep what they cache on their own terms)."""
    cache = DynamicCache(config=config)
    return cache if all(type(layer) is DynamicLayer for layer in cache.layers) else None


def shared_prompt_next_token_logits(model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                                    response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor | None:
    """Logits [N, vocab] for the N response tokens (row-major over ``response_mask``) of rows of left-padded
    prompts [B, P] and right-padded responses [B, R], where rows repeat a prompt (RLOO's and GRPO's samples of
    one prompt): each distinct prompt runs once, its keys and values are copied to every row that repeats it
    (gradients flow back through the copies) and only the responses run per row. None where no prompt repeats
    or the model must run whole: wrapped (DDP, FSDP) or without a separate LM head, a cache layer other than
    full attention (sliding windows), or activation checkpointing in training, where transformers keeps no
    cache."""
    distinct = distinct_rows(prompt_ids, prompt_mask)
    parts = body_and_lm_head(model)
    if distinct is None or parts is None:
        return None
    body, head = parts
    cache = full_attention_cache(body.config)
    if cache is None or (body.training and getattr(body, "gradient_checkpointing", False)):
        return None
    cached = cached_forward_kwargs(body, cache, last_position_only=False)
    unique_ids, unique_mask, copy_of = distinct
    width = prompt_ids.shape[1]
    prompt_hidden = body(input_ids=unique_ids, attention_mask=unique_mask, position_ids=position_ids(unique_mask),
                         **cached).last_hidden_state
    cache.batch_select_indices(copy_of)
    mask = torch.cat([prompt_mask, response_mask.to(prompt_mask.dtype)], 1)
    response_hidden = body(input_ids=response_ids, attention_mask=mask, position_ids=position_ids(mask)[:, width:],
                           **cached).last_hidden_state
    # the state before response token j: the prompt's last one for j = 0, the response's (j - 1)-th after it
    hidden = torch.cat([prompt_hidden[copy_of, -1:], response_hidden[:, :-1]], 1)
    return head(hidden[response_mask.bool()])


def causal_lm_loss_sum(model: nn.Module, batch: dict, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """Summed token cross-entropy over labelled positions, and how many there were."""
    targets = batch["labels"][:, 1:]
    select = targets != IGNORE
    logits = selected_next_token_logits(model, batch["input_ids"], select, batch.get("attention_mask"),
                                        batch.get("position_ids"))
    if label_smoothing:
        loss = F.cross_entropy(logits.float(), targets[select], reduction="sum", label_smoothing=label_smoothing)
    else:  # the same sum, holding no float32 copy of the logits for the backward (models.token_logprobs)
        loss = -token_logprobs(logits, targets[select]).sum()
    return loss, int(select.sum())


# Decoder layers whose layout scored_hidden_states knows: pre-norm, q/k/v/o projections, rotary positions and an
# MLP, with nothing else between, and Llama's rotary and kv-head helpers (Qwen3's and OLMo2's q/k norms,
# Gemma's extra norms and softcapping differ).
PLAIN_DECODER_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"})


def last_layer_runs_apart(body: nn.Module) -> bool:
    """Whether ``body``'s last decoder layer can compute its output at chosen positions only (see
    scored_hidden_states): a plain Llama-style layer, full attention (no sliding window), SDPA or eager."""
    layers = getattr(body, "layers", None)
    config = getattr(body, "config", None)
    if not isinstance(layers, nn.ModuleList) or not layers or config is None:
        return False
    layer = layers[-1]
    attn = getattr(layer, "self_attn", None)
    return (type(layer).__name__ in PLAIN_DECODER_LAYERS and attn is not None
            and getattr(attn, "sliding_window", None) is None and getattr(config, "sliding_window", None) is None
            and getattr(config, "num_hidden_layers", None) == len(layers)
            and getattr(config, "_attn_implementation", None) in (*SDPA_IMPLEMENTATIONS, "eager"))


class LastLayerAt(nn.Module):
    """A plain decoder layer that computes its output only at positions (``rows``, ``cols``): keys and values
    at every position (the chosen ones attend to them), queries, the output projection and the MLP at the
    chosen positions only. The other positions come out as they went in; nothing after the last layer but the
    final norm, which works per position, reads them."""

    def __init__(self, layer: nn.Module, rows: torch.Tensor, cols: torch.Tensor):
        super().__init__()
        self.layer, self.rows, self.cols = layer, rows, cols

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **_: object) -> torch.Tensor:
        layer, rows, cols = self.layer, self.rows, self.cols
        attn = layer.self_attn
        batch, width, _ = hidden_states.shape
        head_dim = attn.head_dim
        x = layer.input_layernorm(hidden_states)
        keys = attn.k_proj(x).view(batch, width, -1, head_dim).transpose(1, 2)  # [B, kv heads, T, d]
        values = attn.v_proj(x).view(batch, width, -1, head_dim).transpose(1, 2)
        queries = attn.q_proj(x[rows, cols]).view(len(rows), -1, 1, head_dim)  # [n, heads, 1, d]
        cos, sin = position_embeddings  # [B, T, d], or [1, T, d] for positions shared by every row
        keys = keys * cos[:, None] + rotate_half(keys) * sin[:, None]
        at = (rows if cos.shape[0] > 1 else torch.zeros_like(rows), cols)
        cos_q, sin_q = cos[at][:, None, None], sin[at][:, None, None]
        queries = queries * cos_q + rotate_half(queries) * sin_q
        groups = queries.shape[1] // keys.shape[1]
        # each chosen position attends within its own row, to its kv heads repeated for grouped-query attention
        keys, values = repeat_kv(keys[rows], groups), repeat_kv(values[rows], groups)
        if attention_mask is None:  # no padding: plain causal attention
            allowed = torch.arange(width, device=cols.device)[None, :] <= cols[:, None]
            mask = allowed[:, None, None, :]
        else:  # the model's 4-D mask, boolean (True: attend) or additive (eager attention); batch 1 broadcasts
            mask_rows = rows if attention_mask.shape[0] > 1 else torch.zeros_like(rows)
            mask = attention_mask[mask_rows, :, cols][:, :, None, :]
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=attn.scaling,
                                             dropout_p=attn.attention_dropout if attn.training else 0.0)
        chosen = hidden_states[rows, cols] + attn.o_proj(out.reshape(len(rows), -1))
        chosen = chosen + layer.mlp(layer.post_attention_layernorm(chosen))
        return hidden_states.index_put((rows, cols), chosen)


def scored_hidden_states(body: nn.Module, rows: torch.Tensor, cols: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
    """``body``'s last hidden states [n, H] at positions (``rows``, ``cols``) only, for a score head that reads
    one position per sequence (a reward model, a classifier). Where the last layer runs apart
    (last_layer_runs_apart), it computes queries, attention output and MLP at those positions alone: a
    reward model's last layer then costs its keys and values plus a few positions, the same numbers for a
    fraction of the work. ``inputs`` are the body's (input_ids, attention_mask, position_ids)."""
    if not last_layer_runs_apart(body):
        return body(**inputs, use_cache=False).last_hidden_state[rows, cols]
    last = body.layers[-1]
    body.layers[-1] = LastLayerAt(last, rows, cols)
    try:
        hidden = body(**inputs, use_cache=False).last_hidden_state
    finally:
        body.layers[-1] = last
    return hidden[rows, cols]
