"""models.lean_layers: Llama-formula RMSNorms and SiLU MLPs that keep fewer activations for the backward, with
the gradients transformers' own modules give (float32: to rounding; bf16 autocast: closer to them than bf16
itself is to float32), in every trainer (training.distributed.wrap_for_training swaps them in)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from alignloop.config import TrainConfig
from alignloop.models.lean_layers import RMSNormFunction, SwiGLUFunction, use_lean_layers
from alignloop.training.distributed import wrap_for_training


def grads_of(fn, *inputs: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_function_matches_llama_rms_norm(dtype):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(48))
    x = (3 * torch.randn(2, 5, 48)).to(dtype)
    grad = torch.randn(2, 5, 48).to(dtype)

    want, (want_dx,) = grads_of(norm, x, grad_out=grad)
    weight = norm.weight.detach().clone().requires_grad_()
    got, (got_dx,) = grads_of(lambda x: RMSNormFunction.apply(x, weight, 1e-6), x, grad_out=grad)
    tol = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_dx, want_dx, **tol)
    # the weight's gradient is a sum over 10 rows: ours adds in float32, autograd in bf16
    torch.testing.assert_close(weight.grad, norm.weight.grad, **({"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32
                                                                 else {"atol": 0.1, "rtol": 2e-2}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_function_matches_silu_times_up(dtype):
    torch.manual_seed(0)
    gate, up, grad = (torch.randn(3, 7, 40).to(dtype) for _ in range(3))
    want, want_grads = grads_of(lambda g, u: F.silu(g) * u, gate, up, grad_out=grad)
    got, got_grads = grads_of(SwiGLUFunction.apply, gate, up, grad_out=grad)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b)


def saved_bytes_loss_grads(model: torch.nn.Module, ids: torch.Tensor, autocast: bool):
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.setdefault(t.data_ptr(), t.numel() * t.element_size())  # a tensor kept by two ops counts once
        return t

    params = {p.data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return sum(n for ptr, n in saved.items() if ptr not in params), loss.item(), grads


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lean_model_trains_like_the_original_on_less_memory(tiny_model_factory, arch):
    folder = tiny_model_factory(arch, hidden=64, layers=2)
    ids = torch.randint(3, 250, (4, 40))

    def load(lean: bool) -> torch.nn.Module:
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").train()
        if lean:
            assert use_lean_layers(model) == 2 * 2 + 1 + 2  # two norms a layer, the final norm, an MLP a layer
        return model

    fp32_bytes, fp32_loss, fp32_grads = saved_bytes_loss_grads(load(False), ids, autocast=False)
    lean_bytes, lean_loss, lean_grads = saved_bytes_loss_grads(load(True), ids, autocast=False)
    assert lean_loss == pytest.approx(fp32_loss, abs=1e-6)
    assert relative(lean_grads, fp32_grads) < 1e-5
    assert lean_bytes < 0.85 * fp32_bytes

    bf16_bytes, bf16_loss, bf16_grads = saved_bytes_loss_grads(load(False), ids, autocast=True)
    lean_bf16_bytes, lean_bf16_loss, lean_bf16_grads = saved_bytes_loss_grads(load(True), ids, autocast=True)
    assert lean_bf16_bytes < 0.85 * bf16_bytes
    assert lean_bf16_loss == pytest.approx(bf16_loss, abs=1e-3)
    # The lean backward's own rounding moves the gradients less than bf16 itself moves them from float32.
    assert relative(lean_bf16_grads, bf16_grads) < relative(bf16_grads, fp32_grads)


def test_only_llama_formula_modules_are_swapped_and_the_state_dict_is_unchanged(tiny_model_factory, tmp_path):
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_model_factory("gpt2"))
    assert use_lean_layers(gpt2) == 0  # LayerNorm and GELU: its own modules

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"))
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_lean_layers(model) == 7
    assert use_lean_layers(model) == 0  # idempotent
    layer = model.model.layers[0]
    assert type(layer.input_layernorm).__name__ == "LeanLlamaRMSNorm"
    assert type(layer.mlp).__name__ == "LeanLlamaMLP"
    state = model.state_dict()
    assert state.keys() == keys.keys() and all(torch.equal(state[k], keys[k]) for k in keys)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(3, 250, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_every_trainer_gets_the_lean_layers(tiny_model_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"))
    wrapped = wrap_for_training(Accelerator(cpu=True), model, TrainConfig())
    assert all(type(m.mlp).__name__ == "LeanLlamaMLP" for m in wrapped.model.layers)
