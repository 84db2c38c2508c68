"""Chosen tokens' log-probabilities and the entropy from logits (models.token_logprobs): the values and gradients
of log_softmax + gather, computed a few rows at a time, holding only the logits for the backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignloop.models import token_logprobs as tl
from alignloop.models.token_logprobs import token_logprobs, token_logprobs_and_entropy


def reference(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0):
    logp_all = torch.log_softmax(logits.float() / temperature, -1)
    return logp_all.gather(-1, tokens[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


def test_by_hand():
    uniform = torch.zeros(2, 4)
    logp, entropy = token_logprobs_and_entropy(uniform, torch.tensor([0, 3]))
    torch.testing.assert_close(logp, torch.full((2,), -math.log(4)))
    torch.testing.assert_close(entropy, torch.full((2,), math.log(4)))
    skewed = torch.log(torch.tensor([[0.25, 0.75]]))
    logp, entropy = token_logprobs_and_entropy(skewed, torch.tensor([1]))
    torch.testing.assert_close(logp, torch.tensor([math.log(0.75)]))
    torch.testing.assert_close(entropy, torch.tensor([0.25 * math.log(4) + 0.75 * math.log(4 / 3)]))
    # temperature 2: softmax([1, 0])[0]
    lp = token_logprobs(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), temperature=2.0)
    torch.testing.assert_close(lp, torch.tensor([1.0 - math.log(math.exp(1.0) + 1.0)]))


@pytest.mark.parametrize("chunk_elements", [50, 200, 1 << 20])  # one row a chunk, 4 rows, all rows at once
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_equal_log_softmax_gather(monkeypatch, chunk_elements, temperature):
    monkeypatch.setattr(tl, "CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 50, generator=g) * 4).requires_grad_()
    tokens = torch.randint(0, 50, (37,), generator=g)
    w_logp, w_entropy = torch.randn(37, generator=g), torch.randn(37, generator=g)

    logp, entropy = token_logprobs_and_entropy(logits, tokens, temperature)
    (logp * w_logp + entropy * w_entropy).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    ref_logp, ref_entropy = reference(logits, tokens, temperature)
    (ref_logp * w_logp + ref_entropy * w_entropy).sum().backward()
    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(entropy, ref_entropy)
    torch.testing.assert_close(ours, logits.grad)

    logits.grad = None
    (token_logprobs(logits, tokens, temperature) * w_logp).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    (reference(logits, tokens, temperature)[0] * w_logp).sum().backward()
    torch.testing.assert_close(ours, logits.grad)


def test_gradcheck_in_float64(monkeypatch):
    monkeypatch.setattr(tl, "CHUNK_ELEMENTS", 14)  # 2 rows a chunk over 5 rows
    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([0, 6, 3, 3, 1])
    assert torch.autograd.gradcheck(lambda x: token_logprobs_and_entropy(x, tokens, 0.5), (logits,))
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, tokens), (logits,))


def test_bf16_logits_get_a_bf16_gradient_and_the_float32_result():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(64, 300, generator=g) * 3).to(torch.bfloat16).requires_grad_()
    tokens = torch.randint(0, 300, (64,), generator=g)
    logp = token_logprobs(logits, tokens)
    assert logp.dtype == torch.float32
    logp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    ours = logits.grad.clone()
    logits.grad = None
    reference(logits, tokens)[0].sum().backward()  # float32 math on the same bf16 values, cast back once
    torch.testing.assert_close(logp, reference(logits.detach(), tokens)[0])
    torch.testing.assert_close(ours, logits.grad)


def test_the_backward_holds_the_logits_and_one_float_a_row():
    """What the memory saving rests on: no [N, vocab] float32 tensor is kept for the backward of bf16 logits
    (log_softmax + gather keeps one, 2x the logits' bytes)."""
    logits = torch.randn(128, 1000).to(torch.bfloat16).requires_grad_()
    tokens = torch.randint(0, 1000, (128,))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        token_logprobs(logits, tokens).sum().backward()
    assert sum(t.numel() * t.element_size() for t in saved) <= logits.numel() * 2 + 128 * 16
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        reference(logits, tokens)[0].sum()
    assert max(t.numel() * t.element_size() for t in saved) == logits.numel() * 4


def test_summed_negative_logprobs_equal_cross_entropy():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(20, 30, generator=g, requires_grad=True)
    targets = torch.randint(0, 30, (20,), generator=g)
    ours = -token_logprobs(logits, targets).sum()
    ours.backward()
    grad = logits.grad.clone()
    logits.grad = None
    expected = F.cross_entropy(logits, targets, reduction="sum")
    expected.backward()
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(grad, logits.grad)
