"""train.gradient_checkpointing: the same gradients for less saved activation memory, in every trainer
(training.distributed.wrap_for_training turns it on, for a causal LM and for PPO's value model alike)."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModel, AutoModelForCausalLM

from alignloop.config import TrainConfig
from alignloop.train.ppo import ValueModel
from alignloop.training.distributed import wrap_for_training


def saved_bytes_and_grads(model: torch.nn.Module, loss_of) -> tuple[int, list[torch.Tensor]]:
    """Bytes the forward kept for the backward, and the parameters' gradients after it."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        loss = loss_of(model)
    loss.backward()
    return sum(saved), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("kind", ["causal_lm", "value_model"])
def test_checkpointing_keeps_the_gradients_and_saves_less(tiny_model_factory, kind):
    folder = tiny_model_factory("llama")
    ids = torch.randint(3, 200, (4, 24))

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        if kind == "causal_lm":
            return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").train()
        body = AutoModel.from_pretrained(folder, attn_implementation="sdpa")
        return ValueModel(body, torch.nn.Linear(body.config.hidden_size, 1)).train()

    def loss_of(model):
        if kind == "causal_lm":
            return model(input_ids=ids, labels=ids).loss
        return model.head(model.body(input_ids=ids).last_hidden_state).square().mean()

    results = {}
    for on in (False, True):
        model = wrap_for_training(Accelerator(cpu=True), build(), TrainConfig(gradient_checkpointing=on))
        results[on] = saved_bytes_and_grads(model, loss_of)
    (plain_bytes, plain_grads), (ckpt_bytes, ckpt_grads) = results[False], results[True]
    assert ckpt_bytes < 0.5 * plain_bytes
    assert len(ckpt_grads) == len(plain_grads)
    for a, b in zip(ckpt_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
