"""Llama-family RMSNorm, SwiGLU MLP and linear forwards that keep fewer activations for the backward.

Autograd keeps every intermediate a formula's backward might read: transformers' RMSNorm keeps its float32
input, its float32 normalised output and the product with its weight; the SwiGLU MLP keeps the gate,
silu(gate), up and their product; under an autocast every linear keeps its own low-precision copy of its
input and of its weight. Here:

- ``RMSNormFunction`` keeps the input and one number per row (its reciprocal RMS) and recomputes the
  normalised row in the backward. Its output keeps transformers' dtype.
- ``SwiGLUFunction`` keeps the gate and up projections and recomputes silu(gate) in the backward;
  ``SwiGLUDownFunction`` also applies the down projection, so silu(gate) * up is recomputed rather than kept.
- ``AutocastLinearFunction`` computes a linear under an autocast exactly as autocast does (input and weight
  cast to its dtype), but the low-precision copy of an input is made once and shared by every linear that
  reads it (q/k/v, gate/up, a LoRA adapter beside its base layer), and the weight's copy is made again in
  the backward instead of being kept. Each linear returns its input's gradient in the input's dtype, so
  the siblings' gradients are summed in float32, as autocast sums them.

What this saves is measured in bench/README.md. ``use_lean_layers`` swaps the class of every module whose
forward is exactly transformers' Llama formula (RMSNorm: about 140 model families share it verbatim; the
MLP: where its activation is SiLU) and of every plain ``nn.Linear``; others keep their own. Parameters,
state dicts and outputs are unchanged.
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


class SwiGLUDownFunction(torch.autograd.Function):
    """``linear(silu(gate) * up, weight, bias)``, the weight cast to the gate's dtype as autocast casts it; keeps
    gate, up and the weight and recomputes the rest in the backward."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(gate, up, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        low = gate.dtype
        return F.linear(F.silu(gate) * up, weight.to(low), None if bias is None else bias.to(low))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up, weight = ctx.saved_tensors
        silu = F.silu(gate)
        grad_weight, grad_bias = linear_weight_grads(ctx, grad_out, silu * up, weight)
        grad_product = grad_out.matmul(weight.to(grad_out.dtype))
        grad_up = grad_product * silu if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(grad_product * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up, grad_weight, grad_bias


class AutocastLinearFunction(torch.autograd.Function):
    """``linear(x_low, weight.to(low), bias.to(low))`` with ``x_low`` a low-precision copy of ``x`` that other
    linears may share; the gradient is returned for ``x`` in x's dtype. Keeps x_low and the weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, x_low: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x_low, weight)
        ctx.x_dtype, ctx.bias_dtype = x.dtype, None if bias is None else bias.dtype
        low = x_low.dtype
        return F.linear(x_low, weight.to(low), None if bias is None else bias.to(low))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_low, weight = ctx.saved_tensors
        grad_weight, grad_bias = linear_weight_grads(ctx, grad_out, x_low, weight)
        grad_x = grad_out.matmul(weight.to(grad_out.dtype)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, grad_weight, grad_bias


def linear_weight_grads(ctx, grad_out: torch.Tensor, inputs: torch.Tensor,
                        weight: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The weight's and bias's gradients of ``linear(inputs, weight, bias)`` (the autograd function's third and
    fourth arguments), computed in the output's dtype and returned in the parameters' own."""
    grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
    grad_weight = grad_bias = None
    if ctx.needs_input_grad[2]:
        grad_weight = grad_2d.t().mm(inputs.reshape(-1, inputs.shape[-1])).to(weight.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        grad_bias = grad_2d.sum(0).to(ctx.bias_dtype)
    return grad_weight, grad_bias


def autocast_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype an enabled autocast on x's device runs a linear of ``x`` and a float32 ``weight`` in (autocast
    casts floating tensors other than float64); None where no autocast would cast them."""
    device = x.device.type
    if weight.dtype != torch.float32 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16) \
            or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def shared_low_copy(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` cast to ``dtype`` outside autograd, made once per tensor and version and kept on the tensor, so
    every linear reading ``x`` saves the same copy."""
    if x.dtype == dtype:
        return x
    cached = getattr(x, "_lean_low_copy", None)
    if cached is not None and cached[0] == x._version and cached[1].dtype == dtype:
        return cached[1]
    with torch.no_grad():
        low = x.to(dtype)
    x._lean_low_copy = (x._version, low)
    return low


class LeanLinear:
    """The forward of a plain ``nn.Linear`` through AutocastLinearFunction where an autocast would cast it and
    gradients are on (mixed into nn.Linear); as nn.Linear's elsewhere."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Without gradients nothing is kept, and autocast's own path reuses one cast of each weight across every
        # call in its region (a whole generation) where this one would cast it at each call.
        low = autocast_dtype(x, self.weight) if torch.is_grad_enabled() else None
        if low is None:
            return F.linear(x, self.weight, self.bias)
        return AutocastLinearFunction.apply(x, shared_low_copy(x, low), self.weight, self.bias)


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
        gate, up = self.gate_proj(x), self.up_proj(x)
        down = self.down_proj
        # A wrapped projection (a LoRA layer, say) runs its own forward on the product; without gradients the
        # product is not kept anyway.
        fused = torch.is_grad_enabled() and isinstance(down, LeanLinear) \
            and gate.dtype in (down.weight.dtype, autocast_dtype(gate, down.weight))
        if fused:
            return SwiGLUDownFunction.apply(gate, up, down.weight, down.bias)
        return down(SwiGLUFunction.apply(gate, up))


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
    """Swap every Llama-formula RMSNorm and SiLU MLP and every plain nn.Linear inside ``model`` to its lean
    forward, in place; returns how many modules were swapped. Idempotent."""
    swapped = 0
    for module in model.modules():
        cls = type(module)
        if isinstance(module, (LeanRMSNorm, LeanSwiGLUMLP, LeanLinear)):
            continue
        if cls is nn.Linear:
            module.__class__ = lean_class(cls, LeanLinear)
            swapped += 1
        elif same_forward(cls, LlamaRMSNorm) and hasattr(module, "variance_epsilon"):
            module.__class__ = lean_class(cls, LeanRMSNorm)
            swapped += 1
        elif same_forward(cls, LlamaMLP) and isinstance(getattr(module, "act_fn", None), (nn.SiLU, SiLUActivation)):
            module.__class__ = lean_class(cls, LeanSwiGLUMLP)
            swapped += 1
    return swapped
