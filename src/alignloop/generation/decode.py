"""Our own decode loop for transformers causal LMs, and the one home of next-token sampling.

``model.generate`` runs every row to the longest one, pays its per-step logits processors, stopping
criteria and cache bookkeeping, and draws with ``torch.multinomial``, which on CPU costs more than a
tiny model's whole forward step (it draws one exponential per vocabulary entry and row). The loop here
prefills the left-padded batch once with only the last position reaching the LM head (each distinct
prompt once: the samples of a prompt share its prefill), then per step
samples every active row with batched tensor ops (one uniform number per row, inverted through the
cumulative distribution), gathers the sampled token's log-prob from the same logits, and drops rows
that hit a stop id from the batch and from the KV cache, so later steps compute only live rows.

The KV cache is preallocated for the whole generation (PreallocatedLayer): DynamicCache concatenates
the whole cache anew every step, and transformers' StaticCache attends over its whole buffer and cannot
drop rows. A model that computes in bf16 (or fp16) on CPU keeps its cache in float32 and attends in
float32 (FLOAT32_ATTENTION): PyTorch's CPU attention kernel at decoding's shapes, one query a row, is
several times slower in bf16 than in float32, while the projections around it keep bf16's speed. On CPU
every plain linear decodes through a copy of its weight that oneDNN has laid out for the batch's matmul
(onednn_packed_linears), made once per sampler call (TransformersSampler.generate): decoding's matmuls have few rows, where the plain weight's
layout leaves most of the CPU's matmul speed unused. What was measured, including what did not pay
(torch.compile of the decode step), is in bench/README.md.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from alignloop.config import SamplingConfig
from alignloop.data.batching import distinct_rows, position_ids
from alignloop.models.attention import SDPA_IMPLEMENTATIONS
from alignloop.models.forward import cached_forward_kwargs, full_attention_cache
from alignloop.models.lean_layers import LeanLinear
from alignloop.models.token_logprobs import token_logprobs

# Temperatures below this sample greedily: logits / T would overflow into inf and nan (as in vLLM).
GREEDY_BELOW_TEMPERATURE = 1e-5


def filtered_probs(logits: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """Unnormalised next-token probabilities [B, V] from logits [B, V], as transformers' generate
    filters them: softmax(logits / T), cut to the top-k tokens (ties with the k-th stay), then to the
    smallest prefix of the renormalised top-k distribution whose mass reaches top-p (the most likely
    token always stays, even for a top-p that is 0 in float32)."""
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    cut_by_top_k = 0 < s.top_k < probs.shape[-1]
    if cut_by_top_k:
        probs = probs.masked_fill(probs < probs.topk(s.top_k, dim=-1).values[..., -1:], 0.0)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        if cut_by_top_k:
            sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= s.top_p  # the mass before a token already reaches top-p
        drop[..., 0] = False
        probs = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)
    return probs


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of unnormalised probabilities [B, V]: a uniform number per row inverted through
    the row's cumulative distribution (a token of probability 0 is never drawn)."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=cdf.dtype) * total
    # u < total in exact arithmetic; the clamp only guards the rounding of that product.
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True)[:, 0]


def sample_tokens(logits: torch.Tensor, s: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: greedy (argmax) at a temperature below GREEDY_BELOW_TEMPERATURE,
    otherwise a draw from filtered_probs."""
    if s.temperature < GREEDY_BELOW_TEMPERATURE:
        return logits.argmax(-1)
    return draw(filtered_probs(logits, s), generator)


class PreallocatedLayer(DynamicLayer):
    """A full-attention layer's cache in a buffer sized for the whole generation: each step writes its
    one column instead of concatenating the whole cache anew (DynamicLayer), and attention reads the
    filled prefix only (transformers' StaticLayer attends over the whole buffer and cannot drop rows)."""

    def __init__(self, max_length: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.max_length = max_length
        self.length = 0
        self.buffer_dtype = dtype  # None: the keys' and values' own

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, _ = key_states.shape
        self.device = key_states.device
        dtype = self.buffer_dtype or key_states.dtype
        shape = (batch, heads, self.max_length, key_states.shape[-1])
        self.key_buffer = key_states.new_empty(shape, dtype=dtype)
        self.value_buffer = value_states.new_empty((*shape[:3], value_states.shape[-1]), dtype=dtype)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length: end] = key_states
        self.value_buffer[:, :, self.length: end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]


def preallocated_cache(model: nn.Module, max_length: int, dtype: torch.dtype | None = None) -> DynamicCache:
    """The model's DynamicCache with every plain full-attention layer preallocated for ``max_length``
    positions, in ``dtype`` (default: the keys' own); sliding-window and other layer kinds keep transformers'
    own."""
    cache = DynamicCache(config=model.config)
    cache.layers = [PreallocatedLayer(max_length, dtype) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    return cache


# transformers' name for float32_attention (registered below for attention and for its masks, as SDPA's).
FLOAT32_ATTENTION = "alignloop_float32_sdpa"


def float32_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' SDPA attention computed in float32 (a float32 cache's keys and values as they are), its
    output back in the query's dtype; outside the caller's autocast, which would cast all three back down
    (under a CPU autocast the rotary embedding has already made queries and keys float32)."""
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(query.dtype), weights


AttentionInterface.register(FLOAT32_ATTENTION, float32_attention)
AttentionMaskInterface.register(FLOAT32_ATTENTION, sdpa_mask)


def computes_below_float32_on_cpu(model: nn.Module) -> bool:
    """Whether ``model`` runs on CPU in bf16 or fp16: its weights' dtype, or the caller's CPU autocast."""
    weights = next(model.parameters())
    if weights.device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") != torch.float32
    return weights.dtype != torch.float32


@contextlib.contextmanager
def float32_decoding(model: nn.Module) -> Iterator[bool]:
    """Within the block, ``model`` attends with float32_attention where it computes below float32 on CPU with
    SDPA attention (yields True: give it a float32 cache), as it was after; yields False elsewhere."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if (config is None or getattr(config, "_attn_implementation", None) not in SDPA_IMPLEMENTATIONS
            or not hasattr(inner, "set_attn_implementation") or not computes_below_float32_on_cpu(model)
            or full_attention_cache(config) is None):
        yield False  # sliding-window layers keep transformers' own cache, in the model's dtype
        return
    before = config._attn_implementation
    inner.set_attn_implementation(FLOAT32_ATTENTION)
    try:
        yield config._attn_implementation == FLOAT32_ATTENTION  # False where the model cannot switch
    finally:
        inner.set_attn_implementation(before)


def packable_linear(module: nn.Module) -> bool:
    """A plain linear (nn.Linear or its lean form; not a quantised or otherwise specialised subclass) whose
    weight is an ordinary CPU tensor (not a DTensor shard) and has no forward of its own set on it."""
    if not (type(module) is nn.Linear or isinstance(module, LeanLinear)) or "forward" in module.__dict__:
        return False
    tensors = [module.weight] if module.bias is None else [module.weight, module.bias]
    return all(type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu" for t in tensors)


@functools.cache
def onednn_packing_works() -> bool:
    """Whether this PyTorch build runs a linear from a oneDNN-packed weight on this CPU (x86 builds do; other
    builds may lack the kernels): tried once on a small linear."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.no_grad():
            weight = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 8), 2)
            out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8), weight, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):  # an op this build lacks, or its kernel
        return False
    return bool((out == 8).all())


def packed_compute_dtype(weight: torch.Tensor) -> torch.dtype | None:
    """The dtype a linear computes in on CPU here (the CPU autocast's, else its weight's), where oneDNN
    can run it from a packed weight: float32, or bfloat16 on a CPU oneDNN supports it on; else None."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype
    if dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return dtype
    return None


@contextlib.contextmanager
def onednn_packed_linears(model: nn.Module, rows: int) -> Iterator[int]:
    """Within the block (no gradients: the packed weights are outside autograd), every packable linear of
    ``model`` computes from a copy of its weight in the dtype it computes in (packed_compute_dtype), laid
    out by oneDNN for matmuls of about ``rows`` rows; yields how many linears it packed. bf16 outputs equal
    the plain forward's bit for bit (both are oneDNN's bf16 matmul); float32 ones differ by rounding (MKL's
    sgemm against oneDNN's). The copies cost one extra copy of the linears' weights while the block runs and
    are dropped after it, so they never go stale when a trainer changes the weights."""
    packed: list[nn.Module] = []
    if (not torch.is_grad_enabled() and next(model.parameters()).device.type == "cpu"
            and onednn_packing_works()):
        for module in model.modules():
            dtype = packed_compute_dtype(module.weight) if packable_linear(module) else None
            if dtype is None:
                continue
            weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach().to(dtype), rows)
            bias = None if module.bias is None else module.bias.detach().to(dtype)

            def packed_forward(x: torch.Tensor, weight=weight, bias=bias, dtype=dtype) -> torch.Tensor:
                return torch.ops.mkldnn._linear_pointwise(x.to(dtype), weight, bias, "none", [], "")

            module.forward = packed_forward  # the instance's forward shadows its class's until the block ends
            packed.append(module)
    try:
        yield len(packed)
    finally:
        for module in packed:
            del module.forward


def decode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, s: SamplingConfig,
           stop_ids: Sequence[int], pad_id: int, keep_logprobs: bool = False,
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Responses [B, R] to a left-padded prompt batch [B, P], pad_id after a row's first stop id (a row
    leaves the batch once it has sampled one, when ``s.stop_on_eos``), and with ``keep_logprobs`` the
    log-prob of every sampled token under logits / temperature (0 on padding). R is the number of steps
    the longest row ran: ``s.max_new_tokens`` unless every row stopped earlier (as model.generate)."""
    with float32_decoding(model) as float32_cache:
        return decode_with_cache(model, input_ids, attention_mask, s, stop_ids, pad_id, keep_logprobs,
                                 torch.float32 if float32_cache else None)


def decode_with_cache(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, s: SamplingConfig,
                      stop_ids: Sequence[int], pad_id: int, keep_logprobs: bool, cache_dtype: torch.dtype | None,
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """decode, its KV cache in ``cache_dtype`` (None: the model's keys' own)."""
    batch = input_ids.shape[0]
    device = input_ids.device
    tokens = torch.full((batch, s.max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((batch, s.max_new_tokens), device=device) if keep_logprobs else None
    stops = torch.tensor(list(stop_ids) if s.stop_on_eos else [], dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)  # the original row of each row still in the batch
    cache = preallocated_cache(model, input_ids.shape[1] + s.max_new_tokens, cache_dtype)
    cached = cached_forward_kwargs(model, cache)
    # Samples of one prompt (RLOO's and GRPO's groups) share its prefill: each distinct row is prefilled once
    # and its KV cache and last logits are copied to the rows that repeat it.
    distinct = distinct_rows(input_ids, attention_mask)
    prefill_ids, prefill_mask, copy_of = distinct or (input_ids, attention_mask, None)
    logits = model(input_ids=prefill_ids, attention_mask=prefill_mask, position_ids=position_ids(prefill_mask),
                   **cached).logits[:, -1]
    if copy_of is not None:
        cache.batch_select_indices(copy_of)
        logits = logits[copy_of]
    mask, positions = attention_mask, position_ids(attention_mask)[:, -1:]
    for step in range(s.max_new_tokens):
        token = sample_tokens(logits, s)
        tokens[rows, step] = token
        if logprobs is not None:
            logprobs[rows, step] = token_logprobs(logits, token, s.temperature)
        if step == s.max_new_tokens - 1:
            break
        stopped = torch.isin(token, stops) if stops.numel() else None
        if stopped is not None and bool(stopped.any()):
            keep = (~stopped).nonzero()[:, 0]
            if keep.numel() == 0:
                return tokens[:, : step + 1], None if logprobs is None else logprobs[:, : step + 1]
            rows, token, mask, positions = rows[keep], token[keep], mask[keep], positions[keep]
            cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1)
        positions = positions + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, **cached).logits[:, -1]
    return tokens, logprobs
