"""Rollouts: left-padded batches compute what single unpadded sequences compute; padding and prompt
tokens never reach a loss; sampling settings never suppress EOS."""

from __future__ import annotations

import random

import pytest
import torch

from alignloop.config import ModelConfig, PPOSettings, SamplingConfig
from alignloop.generation.rollout import Rollout, response_logits, response_logprobs
from alignloop.generation.sampler import TransformersSampler
from alignloop.models.load import load_pretrained
from alignloop.models.tiny import build_tiny_model
from alignloop.train.ppo import (
    ValueModel,
    micro_batch_loss,
    policy_value_head,
    prompt_group_permutation,
    response_logits_and_hidden,
    score_in_length_groups,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

WORDS = "red blue green cat dog bird runs jumps sleeps big small happy sad tree river stone".split()


def build(tmp_path_factory, arch: str):
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(200)]
    path = build_tiny_model(tmp_path_factory.mktemp(arch), texts, arch=arch, vocab_size=300, hidden=32, layers=2,
                            heads=2)
    model, tok = load_pretrained(ModelConfig(name_or_path=str(path)), for_training=False)
    return model.eval(), tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build(tmp_path_factory, "llama")


def generate(model, prompts, s: SamplingConfig, eos_id, pad_id) -> Rollout:
    return TransformersSampler(model, [eos_id], pad_id).generate(prompts, s, keep_logprobs=True)


def prompts_of(tok, n=5):
    rng = random.Random(1)
    return [tok(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))))["input_ids"] for _ in range(n)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_logprobs_equal_unpadded_one_at_a_time(tmp_path_factory, arch):
    model, tok = build(tmp_path_factory, arch)
    prompts = prompts_of(tok)
    assert len({len(p) for p in prompts}) > 1  # the batch really is padded
    torch.manual_seed(0)
    r = generate(model, prompts, SamplingConfig(max_new_tokens=6, temperature=0.7), tok.eos_token_id,
                 tok.pad_token_id)
    with torch.no_grad():
        batched = response_logprobs(model, r, temperature=0.7)
        # the generation pass's own log-probs (KV cache, temperature) agree with a fresh forward
        assert torch.allclose(r.logprobs, batched, atol=1e-4)
        for i, p in enumerate(prompts):
            n = int(r.response_mask[i].sum())
            alone = Rollout(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), r.response_ids[i:i + 1, :n],
                            torch.ones(1, n, dtype=torch.long), r.ended[i:i + 1])
            single = response_logprobs(model, alone, temperature=0.7)[0]
            assert torch.allclose(single, batched[i, :n], atol=1e-5)


def test_padding_and_prompt_never_reach_a_loss(tiny):
    model, tok = tiny
    prompts = prompts_of(tok, 4)
    torch.manual_seed(1)
    r = generate(model, prompts, SamplingConfig(max_new_tokens=6), tok.eos_token_id, tok.pad_token_id)
    # force a short response so there is right padding as well as left padding
    r.response_ids[0, 2] = tok.eos_token_id
    r.response_ids[0, 3:] = tok.pad_token_id
    r.response_mask[0, 3:] = 0
    mask = r.response_mask.float()
    with torch.no_grad():
        assert response_logits(model, r).shape[0] == int(r.response_mask.sum())  # the LM head sees responses only
        old = response_logprobs(model, r, 1.0) + 0.05 * mask
    adv = torch.randn(mask.shape) * mask
    critic = policy_value_head(model)
    settings = PPOSettings(entropy_coef=0.01)

    def loss_of(rr: Rollout, old_logp, advantages):
        with torch.no_grad():
            values = critic(rr, _policy_hidden(model, rr))
            loss, _ = micro_batch_loss(model, critic, True, rr, mask, old_logp, old_logp, advantages, values + 1.0,
                                  values * 0.5, 0.05, settings, 1.0)
        return loss

    base = loss_of(r, old, adv)
    garbled = Rollout(r.prompt_ids.clone(), r.prompt_mask, r.response_ids.clone(), r.response_mask, r.ended)
    garbled.prompt_ids[r.prompt_mask == 0] = 7  # left padding
    garbled.response_ids[r.response_mask == 0] = 9  # right padding
    junk = (1 - mask) * 123.0
    assert torch.allclose(base, loss_of(garbled, old + junk, adv + junk), atol=1e-6)


def _policy_hidden(model, r):
    return response_logits_and_hidden(model, r, True)[1]


def test_value_head_reads_policy_hidden_states(tiny):
    model, tok = tiny
    critic = policy_value_head(model)
    assert isinstance(critic, ValueModel) and critic.body is None
    assert sum(p.numel() for p in critic.parameters()) == model.get_input_embeddings().embedding_dim + 1
    # A fresh critic knows nothing, so it says 0 everywhere: the first advantages are the score-to-go, not
    # the differences of random values between neighbouring tokens.
    r = generate(model, prompts_of(tok, 3), SamplingConfig(max_new_tokens=5), tok.eos_token_id, tok.pad_token_id)
    with torch.no_grad():
        assert torch.count_nonzero(critic(r, _policy_hidden(model, r))) == 0


def test_sampling_never_suppresses_eos_and_ignores_checkpoint_defaults(tiny):
    model, tok = tiny
    prompt = prompts_of(tok, 1)
    # the near-greedy first token becomes "EOS": generation must stop right there
    first = int(generate(model, prompt, SamplingConfig(max_new_tokens=1, temperature=0.01), tok.eos_token_id,
                         tok.pad_token_id).response_ids[0, 0])
    model.generation_config.min_new_tokens = 5  # a checkpoint default that would suppress EOS
    model.generation_config.min_length = 50
    try:
        r = generate(model, prompt, SamplingConfig(max_new_tokens=8, temperature=0.01), first, tok.pad_token_id)
        assert r.response_ids.shape[1] == 1 and bool(r.ended[0])
        fixed = generate(model, prompt, SamplingConfig(max_new_tokens=8, temperature=0.01, stop_on_eos=False),
                         first, tok.pad_token_id)
        assert fixed.response_ids.shape[1] == 8  # fixed length, but the response still ends at the EOS
        assert fixed.response_mask.tolist() == [[1, 0, 0, 0, 0, 0, 0, 0]]
    finally:
        model.generation_config.min_new_tokens = None
        model.generation_config.min_length = 0


def test_selected_rows_drop_shared_prompt_padding_and_keep_their_logprobs(tiny):
    model, tok = tiny
    prompts = prompts_of(tok, 8)
    torch.manual_seed(0)
    r = generate(model, prompts, SamplingConfig(max_new_tokens=5), tok.eos_token_id, tok.pad_token_id)
    short = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))[:3]
    part = r.select(short)
    assert part.prompt_ids.shape[1] == max(len(prompts[i]) for i in short) < r.prompt_ids.shape[1]
    assert part.response_ids.shape == (3, r.response_ids.shape[1])  # [rows, R] tensors still line up
    with torch.no_grad():
        assert torch.allclose(response_logprobs(model, part, 1.0), response_logprobs(model, r, 1.0)[short], atol=1e-5)


def test_length_grouped_scoring_returns_rows_in_rollout_order(tiny):
    model, tok = tiny
    prompts = prompts_of(tok, 7)
    torch.manual_seed(0)
    r = generate(model, prompts, SamplingConfig(max_new_tokens=6), tok.eos_token_id, tok.pad_token_id)
    critic = policy_value_head(model)
    torch.nn.init.normal_(critic.head.weight)  # values that differ from row to row
    with torch.no_grad():
        whole = response_logprobs(model, r, 1.0)
        grouped = score_in_length_groups(r, 3, lambda m: response_logprobs(model, m, 1.0))  # groups of 3, 3, 1
        values = critic(r, _policy_hidden(model, r))
        grouped_values = score_in_length_groups(r, 3, lambda m: critic(m, _policy_hidden(model, m)))
    assert grouped.shape == whole.shape and grouped_values.shape == values.shape
    assert torch.allclose(grouped, whole, atol=1e-5)
    assert torch.allclose(grouped_values, values, atol=1e-5) and values.abs().sum() > 0


def test_scoring_keeps_each_prompts_samples_in_one_group(tiny):
    model, tok = tiny
    prompts = [p for p in prompts_of(tok, 5) for _ in range(3)]  # 5 prompts, 3 contiguous samples each
    torch.manual_seed(0)
    r = generate(model, prompts, SamplingConfig(max_new_tokens=6), tok.eos_token_id, tok.pad_token_id)
    seen = []

    def score(m):
        seen.append(m.prompt_ids.tolist())
        return response_logprobs(model, m, 1.0)

    with torch.no_grad():
        whole = response_logprobs(model, r, 1.0)
        grouped = score_in_length_groups(r, 6, score, rows_per_prompt=3)  # 2 prompts a group: 6, 6, 3 rows
    assert sorted(len(rows) for rows in seen) == [3, 6, 6]
    for rows in seen:  # whole prompts: every prompt in a group appears 3 times
        assert all(rows.count(row) == 3 for row in rows)
    assert torch.allclose(grouped, whole, atol=1e-5)


def test_prompt_group_permutation_keeps_samples_together():
    torch.manual_seed(0)
    perm = prompt_group_permutation(12, 3)
    assert sorted(perm.tolist()) == list(range(12))
    for start in range(0, 12, 3):
        block = perm[start: start + 3].tolist()
        assert block[0] % 3 == 0 and block == [block[0], block[0] + 1, block[0] + 2]
    assert perm.tolist() != list(range(12))
    torch.manual_seed(0)
    ordered = prompt_group_permutation(12, 1)
    torch.manual_seed(0)
    assert torch.equal(ordered, torch.randperm(12))  # one sample a prompt: the plain permutation
