"""Our decode loop (alignloop.generation.decode) against transformers' model.generate.

Greedy decoding equals model.generate token for token on Llama, Qwen2 and GPT-2 tiny models (left-padded
prompts of different lengths, rows that stop mid-batch and leave it, KV cache); sampled log-probs equal a
fresh forward; the first sampled token's frequencies match the distribution transformers' own logits
warpers define (temperature, top-k, top-p) by a chi-square test that a wrong filter fails; without
stop_on_eos every row runs to max_new_tokens; the filter and the draw against hand-computed values;
the oneDNN-packed linears decoding runs on equal the plain ones (bf16 and autocast bit for bit, float32 to
rounding), pack only plain CPU linears without gradients, and leave the model as it was; bench/generate.py
prints both throughputs."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from scipy.stats import chi2
from transformers import AutoModelForCausalLM, DynamicCache, GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from alignloop.config import SamplingConfig
from alignloop.data.batching import left_pad
from alignloop.generation.decode import draw, filtered_probs, onednn_packed_linears, sample_tokens
from alignloop.generation.rollout import response_logprobs
from alignloop.generation.sampler import TransformersSampler
from alignloop.models.forward import cached_forward_kwargs

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

PAD = 1
PROMPTS = [[5, 17, 33], [40, 2, 9, 61, 7, 88, 12], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110],
           [70, 71, 72, 73, 74], [8, 250, 3]]


def chaotic_model(folder, seed: int = 0) -> torch.nn.Module:
    """The tiny model with large random weights: a freshly initialised tiny model repeats the last prompt
    token for ever, which would hide a wrong position or mask; this one's greedy path depends on both."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def hf_greedy(model, prompts, new_tokens: int, stop_ids: list[int] | None) -> torch.Tensor:
    """model.generate's new tokens (pad after a row's stop id) under a complete greedy config."""
    ids, mask = left_pad(prompts, PAD)
    cfg = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=0, repetition_penalty=1.0,
                           eos_token_id=stop_ids, pad_token_id=PAD, use_cache=True, num_beams=1)
    model.generation_config = GenerationConfig()  # nothing inherited from the checkpoint
    return model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)[:, ids.shape[1]:]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_greedy_equals_model_generate_with_rows_stopping_mid_batch(tiny_model_factory, arch):
    model = chaotic_model(tiny_model_factory(arch))
    free = hf_greedy(model, PROMPTS, 12, None)
    # Stop ids the greedy path emits: row 0 stops by step 2, row 2 by step 6, other rows later or never.
    stops = [int(free[0, 2]), int(free[2, 6])]
    reference = hf_greedy(model, PROMPTS, 12, stops)
    first_stop = [next((t for t, tok in enumerate(row.tolist()) if tok in stops), None) for row in free]
    assert first_stop[0] <= 2 and first_stop[2] <= 6 and None in first_stop  # rows end at different steps

    batch_sizes = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    r = TransformersSampler(model, stops, PAD).generate(PROMPTS, SamplingConfig(temperature=0, max_new_tokens=12))
    hook.remove()
    assert torch.equal(r.response_ids, reference)
    assert r.ended.tolist() == [s is not None for s in first_stop]
    assert r.response_mask.sum(1).tolist() == [12 if s is None else s + 1 for s in first_stop]
    # Rows that stopped left the batch: later forwards ran on fewer rows.
    assert batch_sizes[0] == len(PROMPTS) and batch_sizes[-1] == first_stop.count(None)
    assert batch_sizes == sorted(batch_sizes, reverse=True)


def test_greedy_ends_when_every_row_has_stopped(tiny_model_factory):
    model = chaotic_model(tiny_model_factory("llama"))
    free = hf_greedy(model, PROMPTS, 12, None)
    stops = sorted({int(t) for t in free[:, :4].flatten()})  # every row stops within 4 steps
    r = TransformersSampler(model, stops, PAD).generate(PROMPTS, SamplingConfig(temperature=0, max_new_tokens=12))
    assert torch.equal(r.response_ids, hf_greedy(model, PROMPTS, 12, stops))
    assert r.response_ids.shape[1] < 4 and bool(r.ended.all())


def test_sampled_logprobs_equal_a_fresh_forward(tiny_model_factory):
    model = chaotic_model(tiny_model_factory("qwen2"))
    torch.manual_seed(0)
    sampling = SamplingConfig(temperature=0.7, top_k=50, top_p=0.9, max_new_tokens=10)
    free = TransformersSampler(model, [], PAD).generate(PROMPTS, sampling, repeat=2)
    stops = [int(free.response_ids[0, 3]), int(free.response_ids[5, 1])]
    torch.manual_seed(0)
    r = TransformersSampler(model, stops, PAD).generate(PROMPTS, sampling, repeat=2, keep_logprobs=True)
    assert bool(r.ended.any()) and not bool(r.ended.all())
    fresh = response_logprobs(model, r, sampling.temperature)
    torch.testing.assert_close(r.logprobs, fresh, atol=1e-4, rtol=0)
    assert bool((r.logprobs[r.response_mask == 0] == 0).all())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_samples_of_one_prompt_share_its_prefill(tiny_model_factory, arch):
    model = chaotic_model(tiny_model_factory(arch))
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[3], PROMPTS[1], PROMPTS[0]]  # apart and side by side
    batch_sizes = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    torch.manual_seed(0)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8, stop_on_eos=False)
    r = TransformersSampler(model, [], PAD).generate(prompts, sampling, keep_logprobs=True)
    hook.remove()
    assert batch_sizes[0] == 3 and set(batch_sizes[1:]) == {len(prompts)}  # 3 distinct prompts prefilled once
    assert not torch.equal(r.response_ids[0], r.response_ids[2])  # the copies sample on their own
    # every row's copy of its prompt's cache is that row's: its log-probs are a fresh forward's
    torch.testing.assert_close(r.logprobs, response_logprobs(model, r, sampling.temperature), atol=1e-4, rtol=0)
    greedy = TransformersSampler(model, [], PAD).generate(prompts, SamplingConfig(temperature=0, max_new_tokens=8))
    assert torch.equal(greedy.response_ids, hf_greedy(model, prompts, 8, None))


def test_without_stop_on_eos_every_row_runs_to_max_new_tokens(tiny_model_factory):
    model = chaotic_model(tiny_model_factory("llama"))
    first = hf_greedy(model, PROMPTS, 1, None)[:, 0].tolist()
    sampling = SamplingConfig(temperature=0, max_new_tokens=9, stop_on_eos=False)
    r = TransformersSampler(model, first, PAD).generate(PROMPTS, sampling)
    assert torch.equal(r.response_ids, hf_greedy(model, PROMPTS, 9, None))
    # Every row sampled a stop id first; the response still ends there for scoring.
    assert r.response_ids.shape == (len(PROMPTS), 9) and bool(r.ended.all())
    assert r.response_mask.sum(1).tolist() == [1] * len(PROMPTS)


# ---------------------------------------------------------------- the sampling distribution


def warped_probs(logits: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """The distribution model.generate samples from: transformers' own warpers, in its order (it adds
    top-k and top-p only when they are on), then softmax."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(s.temperature)])
    if s.top_k:
        warpers.append(TopKLogitsWarper(s.top_k))
    if s.top_p < 1:
        warpers.append(TopPLogitsWarper(s.top_p))
    return torch.softmax(warpers(None, logits[None].clone()), -1)[0]


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """(statistic, degrees of freedom) of counts against probs; a count where probs is 0 is infinite."""
    n = int(counts.sum())
    if bool((counts[probs == 0] > 0).any()):
        return float("inf"), 0
    support = probs > 0
    expected = probs[support].double() * n
    return float(((counts[support].double() - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def test_first_sampled_token_follows_the_warped_distribution(tiny_model_factory):
    model = chaotic_model(tiny_model_factory("llama"), seed=3)
    prompt = PROMPTS[1]
    logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].detach()
    n = 6000
    for s in (SamplingConfig(temperature=3.0, top_k=40, top_p=0.6, max_new_tokens=1),
              SamplingConfig(temperature=1.3, top_p=0.5, max_new_tokens=1),
              SamplingConfig(temperature=0.5, top_k=7, max_new_tokens=1)):
        expected = warped_probs(logits, s)
        torch.manual_seed(1)
        r = TransformersSampler(model, [], PAD).generate([prompt], s, repeat=n)
        counts = torch.bincount(r.response_ids[:, 0], minlength=logits.shape[0])
        stat, dof = chi_square(counts, expected)
        assert 2 < dof < 60, s  # the filter leaves a real choice, far from the whole vocabulary
        assert stat < chi2.isf(1e-4, dof), s
        # The test has the power to catch a wrong filter: top-p of the un-renormalised top-k mass, or no filter.
        wrong = torch.softmax(logits / s.temperature, -1)
        if s.top_k and s.top_p < 1:
            kept = wrong.masked_fill(wrong < wrong.topk(s.top_k).values[-1], 0)
            sorted_p, order = kept.sort(descending=True)
            drop = sorted_p.cumsum(0) - sorted_p >= s.top_p
            drop[0] = False
            wrong = kept.scatter(0, order[drop], 0.0)
        assert chi_square(counts, wrong / wrong.sum())[0] > chi2.isf(1e-12, dof), s


# ---------------------------------------------------------------- pure helpers, hand-computed


def test_the_cache_reaches_the_model_under_the_name_its_forward_takes(tiny_model_factory):
    """transformers 5.20 renamed past_key_values to cache; under the wrong name **kwargs swallows the cache
    and every step decodes without its history (seen on transformers 5.19: greedy output off model.generate)."""
    class OldForward(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
            return None

    cache = object()
    assert cached_forward_kwargs(OldForward(), cache) == {"past_key_values": cache, "use_cache": True}
    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"))
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    lora = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))  # PEFT's own forward takes **kwargs
    for m in (model, lora):
        kwargs = cached_forward_kwargs(m, cache)
        assert kwargs.pop("logits_to_keep").tolist() == [-1]
        assert kwargs == {name: cache, "use_cache": True}
    assert "logits_to_keep" not in cached_forward_kwargs(model, cache, last_position_only=False)


def test_a_prefill_projects_only_the_last_position_of_every_row(tiny_model_factory):
    """The last position is kept by index (a contiguous [B, 1, H]; a strided slice made torch's matmul expand
    the LM head's weight B times): the logits are the full forward's at the last position."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama")).eval()
    ids = torch.tensor([[5, 17, 33, 40, 2], [1, 1, 9, 61, 7]])
    mask = (ids != 1).long()
    head_inputs = []
    model.lm_head.register_forward_pre_hook(lambda module, args: head_inputs.append(args[0]))
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        kept = model(input_ids=ids, attention_mask=mask, **cached_forward_kwargs(model, DynamicCache())).logits
    assert kept.shape == (2, 1, full.shape[-1])
    assert head_inputs[-1].shape == (2, 1, model.config.hidden_size) and head_inputs[-1].is_contiguous()
    torch.testing.assert_close(kept[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)


def count_linears(model: torch.nn.Module) -> int:
    return sum(type(m) is torch.nn.Linear for m in model.modules())


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "autocast"])
def test_packed_linears_compute_what_the_plain_ones_do(tiny_model_factory, precision):
    model = chaotic_model(tiny_model_factory("llama"))
    if precision == "bfloat16":
        model = model.to(torch.bfloat16)
    ids, mask = left_pad(PROMPTS, PAD)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast")
    with torch.no_grad(), autocast:
        plain = model(input_ids=ids, attention_mask=mask).logits
        with onednn_packed_linears(model, rows=len(PROMPTS)) as n_packed:
            packed = model(input_ids=ids, attention_mask=mask).logits
    if precision != "float32" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert n_packed == 0 and torch.equal(packed, plain)  # a CPU oneDNN has no bf16 matmul on: left alone
        return
    assert n_packed == count_linears(model) == 15  # q, k, v, o, gate, up, down in 2 layers, and the LM head
    if precision == "float32":  # MKL's sgemm against oneDNN's: another summation order
        torch.testing.assert_close(packed, plain, atol=1e-4, rtol=1e-5)
    else:  # both oneDNN's bf16 matmul
        assert packed.dtype == plain.dtype == torch.bfloat16 and torch.equal(packed, plain)
    assert not any("forward" in m.__dict__ for m in model.modules())  # the model is as it was


def test_packed_linears_leave_gradients_specialised_linears_and_errors_alone(tiny_model_factory):
    model = chaotic_model(tiny_model_factory("llama"))
    with onednn_packed_linears(model, rows=4) as n_packed:  # gradients on: the packed weights have no backward
        assert n_packed == 0

    class QuantisedLinear(torch.nn.Linear):
        """Stands for a quantised linear (bitsandbytes' are nn.Linear subclasses): its forward is its own."""

    head = model.lm_head
    head.__class__ = QuantisedLinear
    with torch.no_grad(), onednn_packed_linears(model, rows=4) as n_packed:
        assert n_packed == count_linears(model) == 14  # every plain linear but the head
        assert "forward" not in head.__dict__
    with pytest.raises(RuntimeError, match="inside the block"), torch.no_grad():
        with onednn_packed_linears(model, rows=4):
            raise RuntimeError("inside the block")
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_filtered_probs_temperature_top_k_then_renormalised_top_p():
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.3, 0.1]]))
    torch.testing.assert_close(filtered_probs(logits, SamplingConfig()), torch.tensor([[0.1, 0.5, 0.3, 0.1]]))
    # T = 0.5 squares the probabilities before renormalising: [1, 25, 9, 1] / 36
    torch.testing.assert_close(filtered_probs(logits, SamplingConfig(temperature=0.5)),
                               torch.tensor([[1, 25, 9, 1]]) / 36)
    # top-k 2 keeps 0.5 and 0.3; top-p 0.55 of the renormalised pair [0.625, 0.375] keeps 0.5 alone
    # (of the un-renormalised pair, 0.5 < 0.55 would keep both).
    torch.testing.assert_close(filtered_probs(logits, SamplingConfig(top_k=2)), torch.tensor([[0, 0.5, 0.3, 0]]))
    torch.testing.assert_close(filtered_probs(logits, SamplingConfig(top_k=2, top_p=0.55)),
                               torch.tensor([[0, 0.5, 0, 0]]))
    torch.testing.assert_close(filtered_probs(logits, SamplingConfig(top_p=0.7)), torch.tensor([[0, 0.5, 0.3, 0]]))
    # top-k keeps ties with the k-th token; a top-p that is 0 in float32 keeps the top token
    ties = torch.log(torch.tensor([[0.2, 0.2, 0.2, 0.4]]))
    torch.testing.assert_close(filtered_probs(ties, SamplingConfig(top_k=2)), torch.tensor([[0.2, 0.2, 0.2, 0.4]]))
    torch.testing.assert_close(filtered_probs(ties, SamplingConfig(top_p=1e-50)), torch.tensor([[0, 0, 0, 0.4]]))


def test_draw_inverts_the_cumulative_distribution():
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.3, 0.5, 0.0]] * 3) * 2  # unnormalised: mass 2
    u = torch.rand((3, 1), generator=torch.Generator().manual_seed(7))[:, 0].tolist()
    # cdf / mass: token 1 up to 0.2, token 3 up to 0.5, token 4 up to 1
    expected = [1 if x < 0.2 else 3 if x < 0.5 else 4 for x in u]
    assert draw(probs, torch.Generator().manual_seed(7)).tolist() == expected
    g = torch.Generator().manual_seed(0)
    assert set(draw(probs.repeat(400, 1), g).tolist()) == {1, 3, 4}


def test_sample_tokens_is_greedy_below_the_temperature_floor_and_per_row():
    logits = torch.tensor([[1.0, 3.0, -2.0, 2.5], [4.0, 0.0, 0.0, 0.0]])
    assert sample_tokens(logits, SamplingConfig(temperature=0)).tolist() == [1, 0]
    assert sample_tokens(logits, SamplingConfig(temperature=1e-6)).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    drawn = torch.stack([sample_tokens(logits, SamplingConfig(top_k=1), g) for _ in range(20)])
    assert bool((drawn == torch.tensor([1, 0])).all())


# ---------------------------------------------------------------- the benchmark


@pytest.mark.parametrize("precision", [[], ["--precision", "bf16", "--hf-precision", "fp32"]])
def test_bench_prints_both_throughputs(peer_bench_fixtures, precision):
    bench = Path(__file__).resolve().parents[1] / "bench" / "generate.py"
    out = subprocess.run([sys.executable, str(bench), "--model", "tiny", "--fixtures", str(peer_bench_fixtures),
                          "--batch-size", "4", "--new-tokens", "5", "--repeats", "1", *precision],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, BENCH_OUT=""))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_JSON ")]
    assert len(lines) == 1
    res = json.loads(lines[0].removeprefix("BENCH_JSON "))
    assert res["batch_size"] == 4 and res["new_tokens_per_seq"] == 5 and res["peak_rss_mb"] > 0
    assert res["alignloop"]["new_tokens_per_sec"] > 0 and res["model_generate"]["new_tokens_per_sec"] > 0
    assert res["speedup"] > 0
    assert (res["precision"], res["model_generate_precision"]) == (("bf16", "fp32") if precision else ("fp32", "fp32"))
