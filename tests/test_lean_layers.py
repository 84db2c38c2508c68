"""models.lean_layers: Llama-formula RMSNorms, SiLU MLPs and linears that keep fewer activations for the
backward, with the gradients transformers' own modules give (to rounding, in float32 and under bf16 autocast),
in every trainer (training.distributed.wrap_for_training swaps them in)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from alignloop.config import TrainConfig
from alignloop.models.lean_layers import (
    LeanLinear,
    RMSNormFunction,
    SwiGLUDownFunction,
    SwiGLUFunction,
    lean_class,
    use_lean_layers,
)
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


def saved_tensors(fn, *args):
    """What autograd keeps for the backward of ``fn(*args)``: one entry per storage (dtype, elements)."""
    saved = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.setdefault(t.untyped_storage().data_ptr(), (t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, list(saved.values())


def test_sibling_linears_under_autocast_share_one_copy_and_sum_gradients_as_autocast_does():
    torch.manual_seed(0)
    plain = [torch.nn.Linear(32, 24), torch.nn.Linear(32, 16, bias=False)]
    lean = [torch.nn.Linear(32, 24), torch.nn.Linear(32, 16, bias=False)]
    for a, b in zip(plain, lean, strict=True):
        b.load_state_dict(a.state_dict())
        b.__class__ = lean_class(torch.nn.Linear, LeanLinear)
    x0 = torch.randn(3, 5, 32)

    def run(layers):
        # x is not a leaf, as in a model (autocast caches its cast of a leaf and sums the linears' gradients
        # in bf16)
        x = x0.clone().requires_grad_()

        def forward(x: torch.Tensor) -> torch.Tensor:
            h = x * 1.0
            return torch.cat([m(h) for m in layers], -1).float().pow(2).sum()

        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, saved = saved_tensors(forward, x)
        out.backward()
        return out, saved, x.grad, [p.grad for m in layers for p in m.parameters()]

    want, want_saved, want_dx, want_dparams = run(plain)
    got, got_saved, got_dx, got_dparams = run(lean)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # The same bf16 products (a kernel may round one element's last bit the other way), summed in float32 on
    # both sides: summing in bf16 would be off by far more.
    bf16_ulp = {"atol": 1e-6, "rtol": 2**-7}
    torch.testing.assert_close(got_dx, want_dx, **bf16_ulp)
    assert got_dx.dtype == torch.float32 and relative(got_dx, want_dx) < 1e-3
    for a, b in zip(got_dparams, want_dparams, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, **bf16_ulp)
    # autocast keeps a bf16 copy of x per linear and a bf16 copy of each weight; these keep one copy of x
    assert want_saved.count((torch.bfloat16, 3 * 5 * 32)) == 2
    assert got_saved.count((torch.bfloat16, 3 * 5 * 32)) == 1
    assert (torch.bfloat16, 24 * 32) in want_saved and (torch.bfloat16, 24 * 32) not in got_saved
    # without gradients: autocast's own path, the same output
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(lean[0](x0), plain[0](x0), atol=0, rtol=0)


@pytest.mark.parametrize("autocast", [False, True])
def test_swiglu_down_function_matches_the_down_projection_of_silu_times_up(autocast):
    torch.manual_seed(0)
    down = torch.nn.Linear(40, 24)
    gate, up = torch.randn(3, 7, 40), torch.randn(3, 7, 40)
    grad = torch.randn(3, 7, 24)

    def run(fn):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        down.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            gl, ul = (g.bfloat16(), u.bfloat16()) if autocast else (g, u)  # autocast's linears give bf16
            out, saved = saved_tensors(fn, gl, ul)
        out.float().backward(grad)
        return out, saved, [g.grad, u.grad, down.weight.grad, down.bias.grad]

    want, want_saved, want_grads = run(lambda g, u: down(F.silu(g) * u))
    got, got_saved, got_grads = run(lambda g, u: SwiGLUDownFunction.apply(g, u, down.weight, down.bias))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=2**-7 if autocast else 1e-5)
    assert len(got_saved) < len(want_saved)  # silu(gate) * up (and a bf16 copy of the weight) not kept


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
            # two norms, an MLP and seven linears a layer, the final norm and the output projection
            assert use_lean_layers(model) == 2 * (2 + 1 + 7) + 1 + 1
        return model

    fp32_bytes, fp32_loss, fp32_grads = saved_bytes_loss_grads(load(False), ids, autocast=False)
    lean_bytes, lean_loss, lean_grads = saved_bytes_loss_grads(load(True), ids, autocast=False)
    assert lean_loss == pytest.approx(fp32_loss, abs=1e-6)
    assert relative(lean_grads, fp32_grads) < 1e-5
    assert lean_bytes < 0.85 * fp32_bytes

    bf16_bytes, bf16_loss, bf16_grads = saved_bytes_loss_grads(load(False), ids, autocast=True)
    lean_bf16_bytes, lean_bf16_loss, lean_bf16_grads = saved_bytes_loss_grads(load(True), ids, autocast=True)
    assert lean_bf16_bytes < 0.6 * bf16_bytes
    assert lean_bf16_loss == pytest.approx(bf16_loss, abs=1e-5)
    # The same numerics as autocast's: what differs is rounding, far below what bf16 moves from float32.
    assert relative(lean_bf16_grads, bf16_grads) < 1e-5
    assert relative(bf16_grads, fp32_grads) > 1e-3


def test_only_llama_formula_modules_are_swapped_and_the_state_dict_is_unchanged(tiny_model_factory, tmp_path):
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_model_factory("gpt2"))
    assert use_lean_layers(gpt2) == 1  # only its output projection: LayerNorm, GELU and Conv1D are its own

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"))
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_lean_layers(model) == 2 * (2 + 1 + 7) + 1 + 1
    assert use_lean_layers(model) == 0  # idempotent
    layer = model.model.layers[0]
    assert type(layer.input_layernorm).__name__ == "LeanLlamaRMSNorm"
    assert type(layer.mlp).__name__ == "LeanLlamaMLP"
    assert type(layer.self_attn.q_proj).__name__ == "LeanLinear"
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


def test_lora_adapters_on_lean_layers_get_the_gradients_autocast_gives(tiny_model_factory):
    from peft import LoraConfig, get_peft_model

    folder = tiny_model_factory("llama")
    ids = torch.randint(3, 250, (4, 24))
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])

    def lora_grads(lean: bool, autocast: bool) -> tuple[float, torch.Tensor]:
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), lora).train()
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero, which would leave A without a gradient
                torch.nn.init.normal_(p, std=0.02)
        if lean:
            use_lean_layers(model)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    fp32_loss, fp32 = lora_grads(False, autocast=False)
    lean_fp32_loss, lean_fp32 = lora_grads(True, autocast=False)
    assert lean_fp32_loss == pytest.approx(fp32_loss, abs=1e-6) and relative(lean_fp32, fp32) < 1e-5
    bf16_loss, bf16 = lora_grads(False, autocast=True)
    lean_loss, lean = lora_grads(True, autocast=True)
    assert lean_loss == pytest.approx(bf16_loss, abs=1e-5)
    # The base layer and its adapter share one bf16 copy of their input; the gradients differ from autocast's
    # only where float32 sums taken in another order round a bf16 product the other way: as close to float32.
    assert relative(lean, fp32) < 1.25 * relative(bf16, fp32)
