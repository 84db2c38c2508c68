"""SDPA for training forwards that compute below float32 on CPU, registered with transformers' AttentionInterface.

PyTorch's CPU attention kernel is slower in bf16 than in float32 at training's sequence lengths (fwd + bwd at
8 heads x 64 dims, 8 rows of 110 positions: 14.2 ms in bf16 against 8.7 in float32; the two meet at about
400 positions). ``training_sdpa`` takes the bf16 queries, keys and values a bf16 SDPA would take (rounded as
autocast rounds them), computes the attention on them in float32 and returns its output rounded to bf16: what
the bf16 kernel computes, with float32 arithmetic inside. What autograd saves for the backward is held in bf16,
as the bf16 kernel would hold it: the inputs as their bf16 tensors, the output as the bf16 output returned
(both exact: they are those values), upcast again when the backward reads them. Forwards without gradients,
in float32, with attention dropout or off the CPU are transformers' SDPA itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# transformers' name for training_sdpa (registered below for attention and for its masks, as SDPA's).
TRAINING_SDPA = "alignloop_training_sdpa"
# Attention implementations that compute what transformers' SDPA computes, masks included.
SDPA_IMPLEMENTATIONS = ("sdpa", TRAINING_SDPA)


def low_precision_training_dtype(query: torch.Tensor) -> torch.dtype | None:
    """The dtype below float32 that a CPU forward with gradients computes attention in (the CPU autocast's,
    else the query's own); None where it computes in float32, has no gradients or is not on the CPU."""
    if query.device.type != "cpu" or not torch.is_grad_enabled():
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


@dataclass
class _Saved:
    """A float32 tensor autograd saved, held as ``low`` (its values exactly, in low precision) or as it is."""
    low: torch.Tensor | None = None
    full: torch.Tensor | None = None


def _exactly_low(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    low = t.to(dtype)
    return low if torch.equal(low.float(), t) else None


def training_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0,
                  **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    dtype = low_precision_training_dtype(query)
    if dtype is None or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, **kwargs)
    rounded = [t.to(dtype) for t in (query, key, value)]
    upcast = [t.float() for t in rounded]
    low_of = {t.data_ptr(): r for t, r in zip(upcast, rounded, strict=True)}
    unresolved: list[_Saved] = []

    def pack(t: torch.Tensor) -> torch.Tensor | _Saved:
        if t.dtype != torch.float32:
            return t
        low = low_of.get(t.data_ptr())
        if low is not None and low.shape == t.shape and low.stride() == t.stride():
            return _Saved(low=low)
        if t.dim() == 4 and (low := _exactly_low(t, dtype)) is not None:  # keys and values repeated for GQA
            return _Saved(low=low)
        saved = _Saved(full=t)  # the output (known once the call returns), or anything else: kept as it is
        unresolved.append(saved)
        return saved

    def unpack(saved: torch.Tensor | _Saved) -> torch.Tensor:
        if not isinstance(saved, _Saved):
            return saved
        if saved.low is None:
            return saved.full
        full = torch.empty_strided(saved.low.shape, saved.low.stride(), dtype=torch.float32)
        return full.copy_(saved.low)

    with torch.autocast("cpu", enabled=False), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out, weights = sdpa_attention_forward(module, *upcast, attention_mask, **kwargs)
    low_out = out.to(dtype)
    kernel_layout = low_out.detach().transpose(1, 2)  # transformers returns the kernel's [B, H, L, D] output as [B, L, H, D]
    for saved in unresolved:
        if saved.full.shape == kernel_layout.shape and torch.equal(saved.full.to(dtype), kernel_layout):
            saved.low, saved.full = kernel_layout, None  # the kernel's output: what the backward reads of it
    return low_out, weights


AttentionInterface.register(TRAINING_SDPA, training_sdpa)
AttentionMaskInterface.register(TRAINING_SDPA, sdpa_mask)


def use_training_sdpa(model: nn.Module) -> int:
    """Switch every transformers model inside ``model`` that attends with SDPA to training_sdpa, in place;
    returns how many were switched. Idempotent; saved configs are unchanged (transformers does not write the
    implementation out)."""
    switched = 0
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(module, PreTrainedModel) and getattr(config, "_attn_implementation", None) == "sdpa":
            module.set_attn_implementation(TRAINING_SDPA)
            switched += config._attn_implementation == TRAINING_SDPA
    return switched
