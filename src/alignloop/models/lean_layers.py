"""Llama-family RMSNorm and SwiGLU MLP forwards that keep fewer activations for the backward.

Autograd keeps every intermediate a formula's backward might read: transformers' RMSNorm keeps its float32
input, its float32 normalised output and the product with its weight; the SwiGLU MLP keeps the gate,
silu(gate), up and their product. Here:

- ``RMSNormFunction`` keeps the input and one number per row (its reciprocal RMS) and recomputes the
  normalised row in the backward. Its output keeps transformers' dtype, so under an autocast each linear
  still casts it itself and the gradients they return are summed in float32, as transformers sums them.
- ``SwiGLUFunction`` keeps the gate and up projections and recomputes silu(gate) in the backward.

What this saves is measured in bench/README.md. ``use_lean_layers`` swaps the class of every module whose
forward is exactly transformers' Llama formula (RMSNorm: about 140 model families share it verbatim; the
MLP: where its activation is SiLU); others keep their own. Parameters, state dicts and outputs are
unchanged.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm


class RMSNormFunction(torch.autograd.Function):
    """``weight * (x / rms(x))`` as LlamaRMSNorm computes it (normalised in float32, cast back to x's dtype,
    times the weight); keeps x and the reciprocal RMS for the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad_y = grad_y.float()
        grad_weight = (grad_y * normed).reshape(-1, normed.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        grad_normed = grad_y * weight.float()
        grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), None if grad_weight is None else grad_weight.to(weight.dtype), None


class SwiGLUFunction(torch.autograd.Function):
    """``silu(gate) * up``; keeps gate and up, and recomputes silu for the backward (with PyTorch's own silu
    derivative, in the inputs' dtype as autograd computes it)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_up = grad_out * F.silu(gate)
        grad_gate = torch.ops.aten.silu_backward(grad_out * up, gate)
        return grad_gate, grad_up


class LeanRMSNorm:
    """The forward of a Llama-formula RMSNorm through RMSNormFunction (mixed into the module's own class)."""

    weight: nn.Parameter
    variance_epsilon: float

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


class LeanSwiGLUMLP:
    """The forward of a Llama-formula MLP with SiLU through SwiGLUFunction (mixed into the module's own class)."""

    gate_proj: nn.Module
    up_proj: nn.Module
    down_proj: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(SwiGLUFunction.apply(self.gate_proj(x), self.up_proj(x)))


@functools.cache
def same_forward(cls: type, reference: type) -> bool:
    """Whether ``cls``'s forward is ``reference``'s, written out verbatim (transformers copies the Llama
    modules into other model families as they are)."""
    try:
        return inspect.getsource(cls.forward) == inspect.getsource(reference.forward)
    except (OSError, TypeError):
        return False


@functools.cache
def lean_class(cls: type, lean: type) -> type:
    """``cls`` with ``lean``'s forward mixed in, named after the original."""
    return type(f"Lean{cls.__name__}", (lean, cls), {})


def use_lean_layers(model: nn.Module) -> int:
    """Swap every Llama-formula RMSNorm and SiLU MLP inside ``model`` to its lean forward, in place; returns how
    many modules were swapped. Idempotent."""
    swapped = 0
    for module in model.modules():
        cls = type(module)
        if isinstance(module, (LeanRMSNorm, LeanSwiGLUMLP)):
            continue
        if same_forward(cls, LlamaRMSNorm) and hasattr(module, "variance_epsilon"):
            module.__class__ = lean_class(cls, LeanRMSNorm)
            swapped += 1
        elif same_forward(cls, LlamaMLP) and isinstance(getattr(module, "act_fn", None), (nn.SiLU, SiLUActivation)):
            module.__class__ = lean_class(cls, LeanSwiGLUMLP)
            swapped += 1
    return swapped
