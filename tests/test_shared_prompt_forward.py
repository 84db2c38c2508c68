"""Rows that repeat a prompt (RLOO's and GRPO's samples of one prompt) run it once: the response logits and
every gradient equal those of the whole forward over each row."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignloop.data.batching import left_pad, right_pad
from alignloop.generation.rollout import Rollout, response_logits, sequence_inputs
from alignloop.models.forward import selected_next_token_logits, shared_prompt_next_token_logits

PAD = 0
PROMPTS = [[5, 17, 33], [40, 2, 9, 61, 7, 88, 12], [70, 71, 72, 73, 74]]


def rollout_of(prompt_rows: list[int], responses: list[list[int]]) -> Rollout:
    prompt_ids, prompt_mask = left_pad([PROMPTS[i] for i in prompt_rows], PAD)
    response_ids, response_mask = right_pad(responses, PAD)
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, torch.zeros(len(responses), dtype=torch.bool))


def whole_forward_logits(model, r: Rollout) -> torch.Tensor:
    x = sequence_inputs(r)
    return selected_next_token_logits(model, x["input_ids"], x["select"], x["attention_mask"], x["position_ids"])


def logits_and_grads(model, r: Rollout, forward) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = forward(model, r)
    (logits.float().square().mean()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_repeated_prompts_run_once_with_the_same_logits_and_gradients(tiny_model_factory, arch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory(arch), attn_implementation="sdpa").train()
    for m in model.modules():  # dropout off, as in every RL stage (train.ppo.no_dropout): two forwards comparable
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    # prompt 0 three times (apart and side by side), prompt 1 twice, prompt 2 once; responses of other lengths
    prompt_rows = [0, 0, 1, 2, 1, 0]
    responses = [[9, 8, 7, 6], [9, 8], [3], [11, 12, 13, 14, 15], [4, 4, 4], [21, 22, 23]]
    r = rollout_of(prompt_rows, responses)

    prompt_lengths = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda _, args, kwargs: prompt_lengths.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    shared, shared_grads = logits_and_grads(model, r, response_logits)
    hook.remove()
    assert prompt_lengths[0][0] == 3  # the distinct prompts, once each
    assert prompt_lengths[1] == tuple(r.response_ids.shape)  # then only the responses, per row

    whole, whole_grads = logits_and_grads(model, r, whole_forward_logits)
    assert shared.shape == (sum(map(len, responses)), model.config.vocab_size)
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=1e-5)
    assert shared_grads.keys() == whole_grads.keys()
    for name, grad in whole_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_distinct_prompts_and_checkpointed_training_take_the_whole_forward(tiny_model_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"), attn_implementation="sdpa").train()
    distinct = rollout_of([0, 1, 2], [[9, 8], [3], [4, 4]])
    assert shared_prompt_next_token_logits(model, distinct.prompt_ids, distinct.prompt_mask,
                                           distinct.response_ids, distinct.response_mask) is None
    repeated = rollout_of([0, 0], [[9, 8], [3]])
    model.activation_checkpointing_enable()  # transformers keeps no cache in a checkpointed training forward
    assert shared_prompt_next_token_logits(model, repeated.prompt_ids, repeated.prompt_mask,
                                           repeated.response_ids, repeated.response_mask) is None
    torch.testing.assert_close(response_logits(model, repeated), whole_forward_logits(model, repeated))
