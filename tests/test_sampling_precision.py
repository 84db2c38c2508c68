"""generation.precision: which dtype each stage's transformers sampler decodes in, the sampler's own
weight copy (autocast off, synced by load_weights), and PPO's one mismatch condition (a sampler with
numerics of its own: old log-probs recomputed by the trainer, truncated importance weights logged) that
still learns the toy task, while precision auto leaves PPO's path as it was; eval's KL side scored in
the model's own precision."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM

from alignloop.config import EvalConfig, PPOConfig, SamplingConfig, build_config
from alignloop.errors import UserError
from alignloop.evaluate.eval import Prompt, load_model, sample
from alignloop.generation import backends
from alignloop.generation import decode as decode_module
from alignloop.generation.backends import make_sampler, sampling_dtype
from alignloop.generation.calls import call_ranges
from alignloop.generation.decode import float32_decoding
from alignloop.generation.rollout import response_logprobs
from alignloop.generation.sampler import TransformersSampler
from alignloop.runs import read_metrics
from test_ppo_loop import (
    toy,  # noqa: F401  (a fixture: the PPO toy task)
    toy_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PAD = 1
PROMPTS = [[5, 17, 33], [40, 2, 9, 61, 7, 88, 12], [70, 71, 72, 73, 74]]
IS_STATS = ("rollout_logp_abs_diff", "rollout_is_ratio_max", "rollout_is_clip_frac")


@pytest.fixture
def model(tiny_model_factory) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama")).eval()


def test_sampling_dtype_per_stage_and_precision(model, monkeypatch):
    # a training caller at auto samples under its own autocast, whatever the model's size
    assert sampling_dtype(model, "auto", torch.float32) is None
    assert sampling_dtype(model, "auto", torch.bfloat16) is None
    # explicit precisions: none of its own only where the fp32 model and its trainer already compute in it
    assert sampling_dtype(model, "fp32", torch.float32) is None
    assert sampling_dtype(model, "bf16", torch.bfloat16) is torch.bfloat16  # autocast over fp32 weights
    assert sampling_dtype(model, "bf16", torch.float32) is torch.bfloat16
    assert sampling_dtype(model, "fp32", torch.bfloat16) is torch.float32
    assert sampling_dtype(model, "bf16", None) is torch.bfloat16
    assert sampling_dtype(model, "fp32", None) is None
    # inference-only stages at auto: bf16 exactly where models.precision says it pays on CPU
    monkeypatch.setattr(backends, "bf16_pays_on_cpu", lambda m: False)
    assert sampling_dtype(model, "auto", None) is None
    monkeypatch.setattr(backends, "bf16_pays_on_cpu", lambda m: True)
    assert sampling_dtype(model, "auto", None) is torch.bfloat16
    assert sampling_dtype(model.to(torch.bfloat16), "auto", None) is None  # already bf16 weights (GPU loads)


def test_tiny_models_sample_as_before_at_auto(model):
    sampler = make_sampler(model, [], PAD, SamplingConfig())
    assert sampler.model is model and not sampler.own_numerics


def test_bf16_sampler_decodes_its_own_copy_and_load_weights_syncs_it(model):
    sampling = SamplingConfig(max_new_tokens=6, stop_on_eos=False)
    sampler = make_sampler(model, [], PAD, sampling.model_copy(update={"precision": "bf16"}))
    assert sampler.own_numerics and sampler.model is not model
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is not touched
    assert next(sampler.model.parameters()).dtype == torch.bfloat16
    torch.manual_seed(0)
    r = sampler.generate(PROMPTS, sampling, keep_logprobs=True)
    # the log-probs are the bf16 copy's (which attends in float32 when it decodes on CPU), not the fp32 model's
    with float32_decoding(sampler.model):
        torch.testing.assert_close(r.logprobs, response_logprobs(sampler.model, r, 1.0), atol=1e-4, rtol=0)
    assert (r.logprobs - response_logprobs(model, r, 1.0)).abs().max() > 1e-4
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    sampler.load_weights(model)
    for (name, mine), (_, theirs) in zip(sampler.model.named_parameters(), model.named_parameters(), strict=True):
        assert torch.equal(mine, theirs.to(torch.bfloat16)), name


@pytest.mark.parametrize("how", ["bf16 weights", "bf16 autocast", "fp32"])
def test_decoding_below_float32_on_cpu_attends_in_float32_over_a_float32_cache(model, how, monkeypatch):
    calls = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        calls.append((query.shape[2], key.dtype))
        return decode_module.float32_attention(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, decode_module.FLOAT32_ATTENTION, spy)
    if how == "bf16 weights":
        model = model.to(torch.bfloat16)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "bf16 autocast")
    sampling = SamplingConfig(max_new_tokens=5, stop_on_eos=False)
    torch.manual_seed(0)
    with autocast:
        r = TransformersSampler(model, [], PAD).generate(PROMPTS, sampling, keep_logprobs=True)
        with float32_decoding(model):  # a fresh forward attending in float32 too
            fresh = response_logprobs(model, r, 1.0)
    assert model.config._attn_implementation == "sdpa"  # as it was, after decoding
    if how == "fp32":
        assert not calls  # float32 models decode as they are
        return
    layers = model.config.num_hidden_layers
    assert len(calls) == 5 * layers + layers  # every step of every layer, and the fresh forward's
    assert {dtype for _, dtype in calls[:-layers]} == {torch.float32}  # the cache's keys
    assert {q for q, _ in calls[layers:-layers]} == {1}
    torch.testing.assert_close(r.logprobs, fresh, atol=1e-4, rtol=0)


def test_fp32_sampler_ignores_the_callers_autocast(model):
    sampling = SamplingConfig(max_new_tokens=6, stop_on_eos=False)
    plain = make_sampler(model, [], PAD, sampling)
    fp32 = make_sampler(model, [], PAD, sampling.model_copy(update={"precision": "fp32"}), torch.bfloat16)
    assert fp32.model is model and fp32.own_numerics  # no copy: the weights already are fp32
    torch.manual_seed(0)
    expected = plain.generate(PROMPTS, sampling, keep_logprobs=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(0)
        got = fp32.generate(PROMPTS, sampling, keep_logprobs=True)
        torch.manual_seed(0)
        under_autocast = plain.generate(PROMPTS, sampling, keep_logprobs=True)
    assert torch.equal(got.response_ids, expected.response_ids)
    assert torch.equal(got.logprobs, expected.logprobs)
    assert not torch.equal(under_autocast.logprobs, expected.logprobs)  # what the fp32 setting protects from


def run(toy, out: str, overrides: list[str]) -> tuple[dict, list[dict]]:  # noqa: F811  (the fixture's value)
    from alignloop.train.ppo import run_ppo

    cfg: PPOConfig = toy_config(toy, out, overrides)
    root = run_ppo(cfg, overwrite=True)
    return json.loads((root / "eval.json").read_text()), read_metrics(root / "metrics.jsonl")


def test_ppo_sampling_in_another_precision_corrects_by_importance_weights_and_learns(toy):  # noqa: F811
    settings = ["ppo.steps=20", "train.lr=1e-2", "ppo.ppo_epochs=2", "ppo.kl_coef=0.05"]  # trainer: fp32 (CPU)
    ev, rows = run(toy, "bf16-sampler", settings + ["generation.precision=bf16"])
    assert all(key in row for row in rows for key in IS_STATS), rows[0].keys()
    assert 0 < rows[0]["rollout_logp_abs_diff"] < 0.5  # bf16 against fp32: close, never equal
    assert ev["reward_after"] > max(2 * ev["reward_before"], ev["reward_before"] + 0.2), ev
    # the trainer's own precision, named or auto: no correction, and the same numbers
    ev_fp32, rows_fp32 = run(toy, "fp32-sampler", settings + ["generation.precision=fp32"])
    ev_auto, rows_auto = run(toy, "auto-sampler", settings)
    assert not any(key in row for row in rows_fp32 for key in IS_STATS)
    assert ev_fp32 == ev_auto
    assert [r["score_mean"] for r in rows_fp32] == [r["score_mean"] for r in rows_auto]


def test_precision_is_validated():
    with pytest.raises(UserError, match="generation.precision: Input should be 'auto', 'fp32' or 'bf16'"):
        build_config(PPOConfig, None, {}, ["generation.precision=fp16"])


def test_eval_scores_the_kl_side_in_the_models_own_precision(tiny_model_factory):
    folder = tiny_model_factory("llama")
    model, tok = load_model(str(folder), torch.device("cpu"), None)
    prompts = [Prompt(text, "") for text in ("a b c", "the cat sat on", "one two")]
    bf16 = SamplingConfig(max_new_tokens=6, batch_size=2, precision="bf16")
    cfg = EvalConfig(policy=str(folder), prompts="unused.jsonl", generation=bf16, seed=3)
    calls = call_ranges(len(prompts), bf16.batch_size)
    sampled = sample(model, tok, prompts, calls, cfg, "policy", str(folder))
    kl_side = sample(model, tok, prompts, calls, cfg, "policy", str(folder), kl_side=True)
    assert kl_side.texts == sampled.texts  # the same draws: only the log-probs are scored again
    for fp32, bf16_logp in zip(kl_side.rollouts, sampled.rollouts, strict=True):
        torch.testing.assert_close(fp32.logprobs, response_logprobs(model, fp32, 1.0), atol=1e-5, rtol=0)
        assert (fp32.logprobs - bf16_logp.logprobs).abs().max() > 1e-4
