"""A reward model's last layer computed at the scored positions only gives the scores and the gradients of
the full forward: right-padded and unpadded batches, rows shared by a pair, grouped-query attention, SDPA
and eager attention; other layouts (GPT-2) take the full forward."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification as SeqCls
from transformers import GPT2Config, LlamaConfig, Qwen2Config

from alignloop.data.batching import prompt_response_batch, right_pad
from alignloop.models.forward import body_and_score_head, last_layer_runs_apart, scored_hidden_states
from alignloop.models.reward import head_scores

PAD = 0


def seq_cls(arch: str, attn: str = "sdpa", kv_heads: int = 2):
    common = {"vocab_size": 64, "pad_token_id": PAD, "num_labels": 2}
    if arch == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, **common)
    else:
        cls = LlamaConfig if arch == "llama" else Qwen2Config
        config = cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=kv_heads, max_position_embeddings=128, **common)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return SeqCls.from_config(config).eval()


def sequences(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize(("arch", "attn", "kv_heads"), [("llama", "sdpa", 2), ("llama", "eager", 4),
                                                        ("qwen2", "sdpa", 1), ("gpt2", "sdpa", 4)])
@pytest.mark.parametrize("lengths", [[5, 9, 3, 7], [6, 6, 6]])  # right-padded, and no padding at all
def test_scores_equal_the_full_forward(arch, attn, kv_heads, lengths):
    model = seq_cls(arch, attn, kv_heads)
    parts = body_and_score_head(model)
    assert (parts is not None and last_layer_runs_apart(parts[0])) == (arch != "gpt2")
    seqs = sequences(lengths)
    ids, mask = right_pad(seqs, PAD)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(head_scores(model, seqs, PAD, batch_size=len(seqs)), full, atol=1e-5)


@pytest.mark.parametrize(("arch", "kv_heads"), [("llama", 2), ("qwen2", 1)])
def test_shared_rows_scores_and_gradients_equal_the_full_forward(arch, kv_heads):
    model = seq_cls(arch, kv_heads=kv_heads).train()
    body, head = body_and_score_head(model)
    prompts = sequences([4, 7], seed=2)
    responses = [sequences([3, 5], seed=3), sequences([6, 2], seed=4)]  # a pair per prompt, in one row each
    rows = prompt_response_batch(prompts, responses, PAD, share_prompt=True)
    inputs = {k: rows[k] for k in ("input_ids", "attention_mask", "position_ids")}
    r, c = rows["last"].nonzero(as_tuple=True)

    def loss_and_grads(scores):
        loss = (scores * torch.tensor([1.0, -0.5])).sum()
        grads = torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)
        return scores.detach(), grads

    full, full_grads = loss_and_grads(head(body(**inputs, use_cache=False).last_hidden_state[r, c]))
    apart, apart_grads = loss_and_grads(head(scored_hidden_states(body, r, c, **inputs)))
    assert full.shape == (4, 2)
    assert torch.allclose(apart, full, atol=1e-5)
    for g_full, g_apart in zip(full_grads, apart_grads, strict=True):
        assert (g_full is None) == (g_apart is None)
        if g_full is not None:
            assert torch.allclose(g_apart, g_full, atol=1e-5)
    assert isinstance(body.layers[-1], type(body.layers[0]))  # the layer is put back
