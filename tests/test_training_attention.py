"""models.attention.training_sdpa: a CPU bf16 training forward's attention computed in float32 from the bf16
inputs a bf16 SDPA would take, holding for the backward no more than the bf16 kernel holds, and transformers'
SDPA itself wherever it does not apply. The RL trainers switch their policy and critic to it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from alignloop.generation.decode import FLOAT32_ATTENTION, float32_decoding
from alignloop.models import attention
from alignloop.models.attention import TRAINING_SDPA, training_sdpa, use_training_sdpa
from alignloop.models.lean_layers import use_lean_layers


class Heads(torch.nn.Module):
    """What transformers' SDPA reads from an attention module."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def qkv(batch=3, heads=4, kv_heads=4, length=12, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=g)
    k = torch.randn(batch, kv_heads, length, dim, generator=g)
    v = torch.randn(batch, kv_heads, length, dim, generator=g).bfloat16()  # a v_proj's bf16 output
    mask = torch.ones(batch, 1, length, length, dtype=torch.bool).tril()
    mask[0, :, :, :4] = False  # a left-padded row: its padding keys are masked ...
    mask[0, :, torch.arange(4), torch.arange(4)] = True  # ... and its padding queries see themselves
    return q, k, v, mask


def attend(fn, q, k, v, mask, groups=1):
    """fn's output and the gradients of (q, k, v) for a fixed upstream gradient, under a CPU bf16 autocast."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = fn(Heads(groups), q, k, v, mask, dropout=0.0, scaling=None)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    out.backward(grad)
    return out, [t.grad for t in (q, k, v)]


def float32_on_rounded(_module, q, k, v, mask, **_kwargs):
    """The reference: SDPA in float32 on the inputs rounded to bf16, its output rounded to bf16."""
    with torch.autocast("cpu", enabled=False):
        q, k, v = (t.bfloat16().float() for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).bfloat16(), None


def test_float32_attention_on_the_bf16_inputs_with_the_gradients_of_float32():
    q, k, v, mask = qkv()
    out, grads = attend(training_sdpa, q, k, v, mask)
    want, want_grads = attend(float32_on_rounded, q, k, v, mask)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, want)
    # The backward reads the output rounded to bf16, as the bf16 kernel does: rounding-level differences only.
    for got, ref in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)

    # and it is at least as close to that float32 reference as the bf16 kernel is
    _, bf16_grads = attend(lambda m, *a, **kw: attention.sdpa_attention_forward(m, *a, **kw), q, k, v, mask)
    for got, bf16, ref in zip(grads, bf16_grads, want_grads, strict=True):
        assert (got.float() - ref.float()).norm() <= (bf16.float() - ref.float()).norm()


def held(monkeypatch) -> list:
    records = []

    class Recorded(attention._Saved):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            records.append(self)

    monkeypatch.setattr(attention, "_Saved", Recorded)
    return records


@pytest.mark.parametrize("groups", [1, 2])
def test_what_the_backward_reads_is_held_in_bf16(monkeypatch, groups):
    records = held(monkeypatch)
    q, k, v, mask = qkv(heads=4, kv_heads=4 // groups)
    attend(training_sdpa, q, k, v, mask, groups)
    low = [r.low for r in records if r.low is not None]
    kept = [r.full for r in records if r.full is not None]
    # queries, keys, values (repeated for grouped heads), the output and the mask SDPA made additive; only
    # the per-row logsumexp in float32
    assert len(low) == 5 and all(t.dtype == torch.bfloat16 and t.dim() == 4 for t in low)
    assert [t.shape for t in kept] == [torch.Size([3, 4, 12])]


def test_transformers_sdpa_where_it_does_not_apply():
    q, k, v, mask = qkv()
    plain = attention.sdpa_attention_forward
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # no gradients: the bf16 kernel
        assert torch.equal(training_sdpa(Heads(), q, k, v, mask)[0], plain(Heads(), q, k, v, mask)[0])
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))  # float32 training
    assert torch.equal(training_sdpa(Heads(), q32, k32, v32, mask)[0], plain(Heads(), q32, k32, v32, mask)[0])
    assert attention.low_precision_training_dtype(q32) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention.low_precision_training_dtype(q32) == torch.bfloat16
        torch.manual_seed(0)  # attention dropout: transformers' SDPA draws it
        a = training_sdpa(Heads(), q32, k32, v32, mask, dropout=0.5)[0]
        torch.manual_seed(0)
        b = plain(Heads(), q32, k32, v32, mask, dropout=0.5)[0]
    assert torch.equal(a, b)


def model_grads(folder, switch: bool, checkpointing: bool = False):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").train()
    use_lean_layers(model)
    if switch:
        assert use_training_sdpa(model) == 1
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 250, (4, 30), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:2, :9] = 0  # left padding
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_model_trains_with_it_as_with_the_bf16_kernel(tiny_model_factory, arch):
    folder = tiny_model_factory(arch, hidden=64, layers=2)
    bf16_loss, bf16_grads = model_grads(folder, switch=False)
    loss, grads = model_grads(folder, switch=True)
    assert loss == pytest.approx(bf16_loss, abs=2e-3)
    assert ((grads - bf16_grads).norm() / bf16_grads.norm()).item() < 2e-2
    ckpt_loss, ckpt_grads = model_grads(folder, switch=True, checkpointing=True)
    assert ckpt_loss == loss and torch.equal(ckpt_grads, grads)


def test_switching_is_idempotent_unsaved_and_decoding_switches_back_to_it(tiny_model_factory, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"), attn_implementation="sdpa")
    assert use_training_sdpa(model) == 1 and use_training_sdpa(model) == 0
    assert model.model.layers[0].self_attn.config._attn_implementation == TRAINING_SDPA
    model.save_pretrained(tmp_path)
    assert TRAINING_SDPA not in (tmp_path / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation != TRAINING_SDPA

    with torch.autocast("cpu", dtype=torch.bfloat16), float32_decoding(model) as float32_cache:
        assert float32_cache and model.config._attn_implementation == FLOAT32_ATTENTION
    assert model.config._attn_implementation == TRAINING_SDPA

    eager = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"), attn_implementation="eager")
    assert use_training_sdpa(eager) == 0
