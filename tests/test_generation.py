"""The generation layer: one SamplingConfig and one sampler under every stage that generates.

Same seed, prompts and settings -> the same tokens in PPO / GRPO / RLOO rollouts, collect (and the
pipeline's collect, which calls it), eval and predict; a checkpoint's generation_config leaks into none
of them; collect samples on the device the model was put on; the padding and token-sampling helpers
against hand-computed values."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from alignloop.config import (
    EvalConfig,
    ModelConfig,
    PPOConfig,
    SamplingConfig,
    build_config,
    sampling_from_flags,
)
from alignloop.data.batching import left_pad, left_pad_tensor, length_batches, right_pad
from alignloop.data.tokenize import stop_token_ids
from alignloop.errors import UserError
from alignloop.evaluate.eval import Prompt, load_model, sample
from alignloop.feedback import collect as collect_module
from alignloop.feedback.collect import collect, generate_candidates
from alignloop.feedback.db import Candidate, open_db
from alignloop.generation import backends as backends_module
from alignloop.generation.calls import call_ranges, rollout_seed
from alignloop.generation.rollout import Rollout
from alignloop.generation.sampler import TransformersSampler, inference_device, sample_next_token
from alignloop.models.load import load_pretrained
from alignloop.predict import predict

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

CHATS = [[{"role": "user", "content": "red cat runs"}], [{"role": "user", "content": "blue dog"}],
         [{"role": "user", "content": "big happy tree sleeps by the river"}]]
SEED = 11
SAMPLING = SamplingConfig(max_new_tokens=8, temperature=1.0, batch_size=8)


@pytest.fixture(scope="module")
def models(tiny_model_factory, tmp_path_factory) -> dict[str, Path]:
    """The tiny model, and a copy whose generation_config.json would change every sample if it leaked."""
    clean = tiny_model_factory()
    dirty = tmp_path_factory.mktemp("dirty") / "model"
    shutil.copytree(clean, dirty)
    tok = load_pretrained(ModelConfig(name_or_path=str(clean)), for_training=False)[1]
    config = json.loads((dirty / "generation_config.json").read_text())
    config.update(repetition_penalty=5.0, min_new_tokens=6, suppress_tokens=[tok.eos_token_id], top_k=3)
    (dirty / "generation_config.json").write_text(json.dumps(config))
    return {"clean": clean, "dirty": dirty}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reference(folder: Path, prompts: list, sampling: SamplingConfig, seed: int, repeat: int = 1) -> list[str]:
    """What the sampler itself draws for rendered chat prompts after seeding torch once."""
    model, tok = load_model(str(folder), torch.device("cpu"), None)
    ids = [tok(tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"] for p in prompts]
    torch.manual_seed(seed)
    stop = stop_token_ids(tok, model.config, model.generation_config)
    r = TransformersSampler(model, stop, tok.pad_token_id).generate(ids, sampling, repeat=repeat)
    return [tok.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(r.response_ids, r.response_mask,
                                                                                   strict=True)]


# ---------------------------------------------------------------- each stage's entry point


def eval_texts(folder: Path, sampling: SamplingConfig, seed: int) -> list[str]:
    model, tok = load_model(str(folder), torch.device("cpu"), None)
    cfg = EvalConfig(policy=str(folder), prompts="unused.jsonl", generation=sampling, seed=seed)
    calls = call_ranges(len(CHATS), sampling.batch_size)
    return sample(model, tok, [Prompt(p, "") for p in CHATS], calls, cfg, "policy", str(folder)).texts


def predict_texts(folder: Path, tmp_path: Path, sampling: SamplingConfig) -> list[str]:
    data = write_jsonl(tmp_path / "predict.jsonl", [{"messages": m} for m in CHATS])
    out = predict(folder, str(data), tmp_path / "predictions.jsonl", sampling=sampling)
    return [json.loads(line)["generation"] for line in out.read_text().splitlines()]


def collect_texts(folder: Path, tmp_path: Path, sampling: SamplingConfig, k: int = 2) -> list[str]:
    prompts = write_jsonl(tmp_path / "collect.jsonl", [{"messages": m} for m in CHATS])
    db = f"sqlite:///{tmp_path / 'fb.db'}"
    collect(str(folder), str(prompts), db, "r1", k=k, sampling=sampling)
    with open_db(db)() as s:
        cands = s.query(Candidate).order_by(Candidate.id).all()
        return [c.text for c in cands]


def pipeline_candidates(folder: Path, sampling: SamplingConfig, k: int = 2) -> list[str]:
    """What the pipeline's collect and gold test pairs call (through collect() and directly)."""
    model, tok = load_model(str(folder), torch.device("cpu"), None)
    return [t for texts in generate_candidates(model, tok, CHATS, k, sampling) for t in texts]


class RecordingSampler(TransformersSampler):
    """Every generate call of a PPO run: the RNG state it started from, its inputs and what it drew."""

    calls: list[dict] = []

    def generate(self, prompts, sampling, **kwargs) -> Rollout:
        state = torch.get_rng_state()
        r = super().generate(prompts, sampling, **kwargs)
        RecordingSampler.calls.append({"rng": state, "prompts": [list(p) for p in prompts], "sampling": sampling,
                                       "kwargs": kwargs, "response_ids": r.response_ids.clone()})
        return r


def zero_reward(prompts, responses, **_):
    return [0.0 for _ in responses]


def ppo_calls(folder: Path, tmp_path: Path, algorithm: str, monkeypatch) -> list[dict]:
    from alignloop.train import ppo as ppo_module

    prompts = write_jsonl(tmp_path / "ppo.jsonl", [{"messages": m} for m in CHATS * 2])
    cfg = build_config(PPOConfig, None, {"model.name_or_path": str(folder), "data.train": str(prompts),
                                         "data.eval": str(prompts), "output_dir": str(tmp_path / algorithm)},
                       ["reward.functions=[test_generation:zero_reward]", "ppo.critic=policy_head",
                        f"ppo.algorithm={algorithm}", "ppo.steps=1", "ppo.rollout_size=4", "ppo.mini_batch_size=4",
                        "ppo.micro_batch_size=4", "ppo.ppo_epochs=1", "train.report_to=[]",
                        f"ppo.samples_per_prompt={1 if algorithm == 'ppo' else 2}", "generation.max_new_tokens=8"])
    RecordingSampler.calls = []
    monkeypatch.setattr(backends_module, "TransformersSampler", RecordingSampler)
    ppo_module.run_ppo(cfg, overwrite=True)
    return RecordingSampler.calls


# ---------------------------------------------------------------- same seed, prompts, settings -> same tokens


def test_collect_eval_predict_and_pipeline_draw_the_same_tokens(models, tmp_path):
    seeded = SAMPLING.model_copy(update={"seed": SEED})
    one_each = reference(models["clean"], CHATS, SAMPLING, SEED)
    assert len(set(one_each)) == len(CHATS)  # the prompts really get different samples
    assert predict_texts(models["clean"], tmp_path, seeded) == one_each
    # eval and collect seed each generation call by its first prompt (the same on any number of processes):
    # one call here, from prompt 0
    call_seed = rollout_seed(SEED, 0, 0)
    assert eval_texts(models["clean"], SAMPLING, SEED) == reference(models["clean"], CHATS, SAMPLING,
                                                                      call_seed)
    # collect: the K samples of a prompt in adjacent rows (as num_return_sequences laid them out before)
    two_each = reference(models["clean"], CHATS, SAMPLING, call_seed, repeat=2)
    assert collect_texts(models["clean"], tmp_path, seeded) == [t.strip() for t in two_each]
    assert pipeline_candidates(models["clean"], seeded) == [t.strip() for t in two_each]


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo"])
def test_ppo_family_rollouts_draw_what_the_sampler_draws(models, tmp_path, monkeypatch, algorithm):
    calls = ppo_calls(models["clean"], tmp_path, algorithm, monkeypatch)
    assert len(calls) == 3  # held-out reward before, the step's rollout, held-out reward after
    model, tok = load_model(str(models["clean"]), torch.device("cpu"), None)
    for call in (calls[0], calls[1]):  # both drawn by the starting policy
        assert call["sampling"] == PPOConfig.model_fields["generation"].default.model_copy(
            update={"max_new_tokens": 8})
        torch.set_rng_state(call["rng"])
        again = TransformersSampler(model, stop_token_ids(tok, model.config, model.generation_config),
                                    tok.pad_token_id).generate(
            call["prompts"], call["sampling"], **call["kwargs"])
        assert torch.equal(again.response_ids, call["response_ids"])


# ---------------------------------------------------------------- the checkpoint's generation_config never leaks


def test_checkpoint_generation_config_leaks_into_no_stage(models, tmp_path, monkeypatch):
    dirty, clean = models["dirty"], models["clean"]
    # The dirty config does change what model.generate samples when it is left in charge.
    outputs = {}
    for name, folder in models.items():
        model, tok = load_model(str(folder), torch.device("cpu"), None)
        ids = tok(CHATS[0][0]["content"], return_tensors="pt")
        torch.manual_seed(0)
        outputs[name] = model.generate(**ids, do_sample=True, max_new_tokens=8, pad_token_id=tok.pad_token_id)
    assert not torch.equal(outputs["dirty"], outputs["clean"])

    seeded = SAMPLING.model_copy(update={"seed": SEED})
    assert eval_texts(dirty, SAMPLING, SEED) == eval_texts(clean, SAMPLING, SEED)
    (tmp_path / "d").mkdir()
    assert predict_texts(dirty, tmp_path / "d", seeded) == predict_texts(clean, tmp_path, seeded)
    greedy = SamplingConfig(temperature=0, max_new_tokens=8, seed=0)
    assert predict_texts(dirty, tmp_path / "d", greedy) == predict_texts(clean, tmp_path, greedy)
    (tmp_path / "dc").mkdir()
    assert collect_texts(dirty, tmp_path / "dc", seeded) == collect_texts(clean, tmp_path, seeded)
    assert pipeline_candidates(dirty, seeded) == pipeline_candidates(clean, seeded)
    (tmp_path / "dp").mkdir()
    dirty_rollouts = [c["response_ids"] for c in ppo_calls(dirty, tmp_path / "dp", "ppo", monkeypatch)]
    clean_rollouts = [c["response_ids"] for c in ppo_calls(clean, tmp_path, "ppo", monkeypatch)]
    assert all(torch.equal(a, b) for a, b in zip(dirty_rollouts, clean_rollouts, strict=True))


def test_eos_ends_a_response_even_when_the_checkpoint_suppresses_it(models):
    model, tok = load_model(str(models["dirty"]), torch.device("cpu"), None)
    prompt = [tok("red cat")["input_ids"]]
    sampler = TransformersSampler(model, [tok.eos_token_id], tok.pad_token_id)
    first = int(sampler.generate(prompt, SamplingConfig(temperature=0, max_new_tokens=1)).response_ids[0, 0])
    r = TransformersSampler(model, [first], tok.pad_token_id).generate(prompt, SamplingConfig(temperature=0))
    assert r.response_ids.shape[1] == 1 and bool(r.ended[0])  # the first greedy token, taken as EOS, ends it


# ---------------------------------------------------------------- device


def test_inference_device_is_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert inference_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference_device() == torch.device("cpu")


def sampling_devices(monkeypatch) -> list[torch.device]:
    seen: list[torch.device] = []

    class Recording(TransformersSampler):
        def generate(self, prompts, sampling, **kwargs):
            seen.append(next(self.model.parameters()).device)
            return super().generate(prompts, sampling, **kwargs)

    monkeypatch.setattr(backends_module, "TransformersSampler", Recording)
    return seen


def test_collect_samples_on_the_device_it_chose(models, tmp_path, monkeypatch):
    chosen = []
    monkeypatch.setattr(collect_module, "inference_device", lambda: chosen.append(1) or torch.device("cpu"))
    seen = sampling_devices(monkeypatch)
    collect_texts(models["clean"], tmp_path, SAMPLING)
    assert chosen and seen == [torch.device("cpu")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_collect_samples_on_cuda(models, tmp_path, monkeypatch):
    seen = sampling_devices(monkeypatch)
    collect_texts(models["clean"], tmp_path, SAMPLING)
    assert [d.type for d in seen] == ["cuda"]


# ---------------------------------------------------------------- settings


def test_sampling_settings_validated_per_stage():
    flags = {"model.name_or_path": "m", "data.train": "t", "ppo.critic": "policy_head"}
    with pytest.raises(UserError, match="generation.temperature must be > 0"):
        build_config(PPOConfig, None, flags, ["generation.temperature=0"])
    with pytest.raises(UserError, match="generation.seed: this stage draws from train.seed"):
        build_config(PPOConfig, None, flags, ["generation.seed=3"])
    with pytest.raises(ValueError, match="generation.temperature must be > 0"):
        EvalConfig(policy="p", prompts="q", generation=SamplingConfig(temperature=0))
    assert SamplingConfig(temperature=0).temperature == 0  # greedy: predict and serve
    with pytest.raises(UserError, match="sampling flags: top_p"):
        sampling_from_flags(top_p=1.5)


def test_collect_rejects_greedy(models, tmp_path):
    with pytest.raises(UserError, match="--temperature must be in"):
        collect_texts(models["clean"], tmp_path, SamplingConfig(temperature=0))


# ---------------------------------------------------------------- pure helpers, hand-computed


def test_left_and_right_padding():
    ids, mask = left_pad([[1, 2, 3], [4], []], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    ids, mask = right_pad([[1, 2, 3], [4]], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = right_pad([[1, 2, 3], [4]], pad_id=9, pad_to_multiple_of=4)
    assert ids.tolist() == [[1, 2, 3, 9], [4, 9, 9, 9]] and mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    grown = left_pad_tensor(torch.tensor([[5, 6]]), 4, dim=1)
    assert grown.tolist() == [[0, 0, 5, 6]]
    assert left_pad_tensor(grown, 4, dim=1) is grown
    assert length_batches([3, 1, 2, 1], 2) == [[1, 3], [2, 0]]


def test_next_token_sampling_greedy_top_k_top_p():
    logits = torch.log(torch.tensor([0.1, 0.5, 0.3, 0.1]))
    assert sample_next_token(logits, SamplingConfig(temperature=0), None) == 1
    g = torch.Generator().manual_seed(0)
    # top-k 2 keeps tokens 1 and 2; top-p 0.5 keeps token 1 alone (its mass reaches 0.5)
    assert {sample_next_token(logits, SamplingConfig(top_k=2), g) for _ in range(200)} == {1, 2}
    assert {sample_next_token(logits, SamplingConfig(top_p=0.5), g) for _ in range(50)} == {1}
    assert {sample_next_token(logits, SamplingConfig(top_p=0.7), g) for _ in range(200)} == {1, 2}
    assert {sample_next_token(logits, SamplingConfig(), g) for _ in range(400)} == {0, 1, 2, 3}


def test_next_token_sampling_at_the_extremes_is_greedy():
    """Settings a client may send (found by fuzzing the server): a top-p below float32's smallest number
    still keeps the top token, and a temperature so small that logits / T overflows samples greedily."""
    logits = torch.tensor([1.0, 3.0, -2.0, 2.5])
    g = torch.Generator().manual_seed(0)
    for settings in (dict(top_p=5e-324), dict(temperature=1e-300), dict(temperature=5e-324, top_p=1e-50),
                     dict(temperature=1e-6)):
        assert {sample_next_token(logits, SamplingConfig(**settings), g) for _ in range(20)} == {1}, settings


def test_logprobs_need_a_sampling_temperature(models):
    model, tok = load_model(str(models["clean"]), torch.device("cpu"), None)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="temperature > 0"):
        TransformersSampler(model, [tok.eos_token_id], tok.pad_token_id).generate(
            [[1, 2]], SamplingConfig(temperature=0), keep_logprobs=True)
