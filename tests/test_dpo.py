"""`alignloop dpo`: sequence log-probs of a padded batch, feedback forms turned into units, every
objective learning a held-out preference (the repeat task: chosen = the correct repetition, rejected =
its second half replaced by other words), KTO on unpaired examples, and one-line errors for bad records."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import processors

from alignloop.cli import main
from alignloop.config import DPOConfig, ModelConfig, build_config
from alignloop.data.batching import prompt_response_batch
from alignloop.data.io import Record
from alignloop.errors import UserError
from alignloop.models.forward import shares_prompt
from alignloop.models.load import load_pretrained
from alignloop.train.dpo import (
    criteria_settings,
    encode_units,
    kto_units,
    pair_units,
    parse_record,
    run_dpo,
    sequence_logprobs,
)
from conftest import WORDS, repeat_task, write_jsonl


def preference_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for r in repeat_task(n, seed):
        words = r["completion"].split()
        wrong = words[:3] + [rng.choice([w for w in WORDS if w != x]) for x in words[3:]]
        out.append({"prompt": r["prompt"], "chosen": r["completion"], "rejected": " ".join(wrong)})
    return out


def unpaired(pairs: list[dict]) -> list[dict]:
    return [rec for p in pairs for rec in ({"prompt": p["prompt"], "completion": p["chosen"], "label": True},
                                           {"prompt": p["prompt"], "completion": p["rejected"], "label": False})]


def dpo_config(model: Path, train: Path, held_out: Path, out: Path, *overrides: str) -> DPOConfig:
    return build_config(DPOConfig, None, {"model.name_or_path": str(model), "data.train": str(train),
                                          "data.eval": str(held_out), "output_dir": str(out)},
                        ["train.report_to=[]", "train.lr=1e-3", "train.batch_size=8", "train.log_steps=5",
                         *overrides])


# ---------------------------------------------------------------- sequence log-probs


def test_padded_batch_gives_each_sequence_its_own_logprob_and_counts_only_response_tokens(tiny_model):
    model, tok = load_pretrained(ModelConfig(name_or_path=str(tiny_model), dropout=0.0))
    model.eval()
    assert shares_prompt(model)  # SDPA attention: the default
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 300) for _ in range(n)] for n in (3, 9, 1, 6)]
    # a pair, a single response, a ranking of three, a pair: a prompt's responses share its row
    lengths = ((5, 2), (7,), (1, 4, 3), (2, 2))
    responses = [[[rng.randrange(3, 300) for _ in range(n)] for n in ns] for ns in lengths]
    shared = prompt_response_batch(prompts, responses, tok.pad_token_id, True)
    # one row per prompt: the prompt but its last token once, then per response its last token + the response
    row_lengths = [len(p) - 1 + sum(n + 1 for n in ns) for p, ns in zip(prompts, lengths, strict=True)]
    assert row_lengths == [11, 16, 11, 11]
    assert shared["input_ids"].shape == (4, 16) and shared["attention_mask"].shape == (4, 1, 16, 16)
    assert shared["tokens"] == sum(row_lengths)
    with torch.no_grad():
        batched, tokens = sequence_logprobs(model, shared)
        # A row per response (as for attention without a custom mask) and another pad id change nothing.
        rowed, _ = sequence_logprobs(model, prompt_response_batch(prompts, responses, tok.pad_token_id, False))
        other_pad, _ = sequence_logprobs(model, prompt_response_batch(prompts, responses, 7, True))
        i = 0
        for p, answers in zip(prompts, responses, strict=True):
            for r in answers:
                alone, n = sequence_logprobs(model, prompt_response_batch([p], [[r]], tok.pad_token_id, True))
                # By hand: one unpadded sequence, log-softmax of the positions that predict response tokens.
                logits = model(input_ids=torch.tensor([p + r])).logits[0].float()
                logp = torch.log_softmax(logits, -1)
                by_hand = sum(logp[len(p) - 1 + t, tok_id].item() for t, tok_id in enumerate(r))
                assert alone.item() == pytest.approx(by_hand, abs=1e-4)
                assert batched[i].item() == pytest.approx(by_hand, abs=1e-4)
                assert n.item() == tokens[i].item() == len(r)
                i += 1
    assert i == len(batched)
    assert torch.allclose(batched, rowed, atol=1e-5)
    assert torch.allclose(batched, other_pad, atol=1e-5)


# ---------------------------------------------------------------- feedback forms -> units


def records(*rows: dict) -> list[Record]:
    return [Record(r, f"fb.jsonl:{i + 1}") for i, r in enumerate(rows)]


def test_feedback_forms_become_units():
    cfg = build_config(DPOConfig, None, {"model.name_or_path": "m", "data.train": "fb.jsonl"},
                       ["score_scale=[1, 5]", "dpo.rating_margin=0.2"])
    settings = criteria_settings(cfg)
    chat = [{"role": "user", "content": "hi"}]
    parsed = [parse_record(r, settings) for r in records(
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        {"chosen": "\n\nHuman: q\n\nAssistant: yes", "rejected": "\n\nHuman: q\n\nAssistant: no"},
        {"prompt": chat, "responses": ["a", "b", "c", "d"], "ranking": [2, [0, 3], 1]},
        {"prompt": "r", "response": "x", "score": 5}, {"prompt": "r", "response": "y", "score": 4},
        {"prompt": "r", "response": "z", "score": 1}, {"prompt": "r", "response": "x", "score": 3},
    )]
    units = pair_units(parsed, cfg)
    pair, hh, ranking, rated = units
    assert (pair.prompt, pair.responses, pair.pairs) == ("p", ["good", "bad"], [(0, 1)])
    assert (hh.prompt, hh.responses) == ("\n\nHuman: q\n\nAssistant:", [" yes", " no"])
    # all pairs of the ranking in one unit: 2 > 0, 3, 1; 0 > 1; 3 > 1 (0 and 3 tie)
    assert ranking.prompt == chat and sorted(ranking.pairs) == sorted([(2, 0), (2, 3), (2, 1), (0, 1), (3, 1)])
    # ratings of prompt "r" on [1, 5]: x = mean(1, 0.5) = 0.75, y = 0.75, z = 0: pairs need a gap > 0.2
    assert rated.responses == ["x", "y", "z"] and sorted(rated.pairs) == [(0, 2), (1, 2)]
    best = pair_units(parsed, cfg.model_copy(update={"dpo": cfg.dpo.model_copy(
        update={"ranking_pairs": "best_vs_rest"})}))
    assert sorted(best[2].pairs) == [(2, 0), (2, 1), (2, 3)]

    kto = kto_units(parsed + [parse_record(r, settings) for r in records(
        {"prompt": "u", "completion": "fine", "label": True})], cfg)
    examples = [(u.prompt if isinstance(u.prompt, str) else "chat", u.responses[0], u.desirable[0]) for u in kto]
    # pairs: chosen desirable, rejected undesirable; ranking: best desirable, worst undesirable (middle left
    # out); mean ratings against the midpoint 0.5: x 0.75, y 0.75, z 0
    assert examples == [("p", "good", True), ("p", "bad", False), ("\n\nHuman: q\n\nAssistant:", " yes", True),
                        ("\n\nHuman: q\n\nAssistant:", " no", False), ("chat", "c", True), ("chat", "b", False),
                        ("u", "fine", True), ("r", "x", True), ("r", "y", True), ("r", "z", False)]


# ---------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def repeat_prefs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prefs")
    return write_jsonl(root / "train.jsonl", preference_pairs(200, 1)), write_jsonl(root / "held_out.jsonl",
                                                                                     preference_pairs(64, 2))


# ORPO's NLL term first has to teach a random tiny model to copy: a larger odds-ratio weight and budget.
LEARNING = {"sigmoid": [], "ipo": [], "simpo": [],
            "orpo": ["dpo.beta=2", "train.lr=3e-3", "train.epochs=3"]}


@pytest.mark.slow(seconds=12)
@pytest.mark.parametrize("loss", list(LEARNING))
def test_implicit_reward_learns_held_out_preferences(loss, tiny_model, repeat_prefs, tmp_path):
    train, held_out = repeat_prefs
    out = run_dpo(dpo_config(tiny_model, train, held_out, tmp_path / "run", f"dpo.loss={loss}", *LEARNING[loss]))
    ev = json.loads((out / "eval.json").read_text())
    before, after = ev["validation_before"]["reward_accuracy"], ev["validation"]["reward_accuracy"]
    assert 0.4 <= before <= 0.6, before
    assert after >= 0.75, (before, after)
    assert ev["validation"]["units"] == 64 and (out / "model" / "alignloop.json").is_file()
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in steps if "loss" in r and r["step"] > 0]
    assert {"reward_chosen", "reward_rejected", "reward_accuracy", "reward_margin", "logp_chosen",
            "logp_rejected"} <= trained[-1].keys()
    assert not (out / "reference").exists()  # live reference, or none (SimPO, ORPO)


@pytest.mark.slow(seconds=8)
def test_kto_raises_desirable_over_undesirable_margin_on_unpaired_data(tiny_model, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", unpaired(preference_pairs(200, 1)))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", unpaired(preference_pairs(64, 2)))
    out = run_dpo(dpo_config(tiny_model, train, held_out, tmp_path / "run", "dpo.loss=kto",
                             "dpo.reference=precompute"))
    ev = json.loads((out / "eval.json").read_text())
    before, after = ev["validation_before"], ev["validation"]
    assert after["desirable"] == after["undesirable"] == 64
    assert before["reward_margin"] == 0.0 < after["reward_margin"]
    assert after["logp_margin"] > before["logp_margin"] + 0.3
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if "loss" in r][-1]
    assert {"kl", "desirable_share", "reward_desirable", "reward_undesirable"} <= last.keys()
    assert 0 < last["desirable_share"] < 1
    # 400 training examples: two cached chunks of at most 256; the 128 held-out examples: one
    assert sorted(p.name for p in (out / "reference").iterdir()) == [
        "train-00000.safetensors", "train-00001.safetensors", "validation-00000.safetensors"]


def test_lora_reference_is_the_base_with_the_adapter_off(tiny_model, repeat_prefs, tmp_path):
    train, held_out = repeat_prefs
    runs = []
    for global_seed in (0, 1):  # the adapter's random init comes from train.seed, not from what ran before
        torch.manual_seed(global_seed)
        out = run_dpo(dpo_config(tiny_model, train, held_out, tmp_path / f"run{global_seed}", "model.adapter=lora",
                                 "model.lora.r=4", "train.lr=1e-2", "train.max_steps=12"))
        runs.append(json.loads((out / "eval.json").read_text()))
    ev = runs[0]
    # At step 0 the policy is the reference: every implicit reward is exactly 0.
    assert ev["validation_before"]["reward_chosen"] == ev["validation_before"]["reward_rejected"] == 0.0
    assert ev["validation"]["reward_accuracy"] > 0.6
    assert runs[1]["validation"] == ev["validation"]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "chosen": "a"}, "fb.jsonl:2: field 'rejected' is missing"),
    ({"prompt": "p", "completion": "a", "label": True}, "fb.jsonl:2: an unpaired example ('label') trains "
                                                        "only with dpo.loss=kto"),
    ({"prompt": "p", "completion": "a", "label": "yes"}, "fb.jsonl:2: field 'label': Input should be a valid "
                                                         "boolean"),
])
def test_bad_record_is_one_line_naming_file_and_line(record, message, tmp_path, capsys, tiny_model):
    data = write_jsonl(tmp_path / "fb.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, record])
    code = main(["dpo", "--policy", str(tiny_model), "--data", str(data), "--output", str(tmp_path / "run"),
                 "train.report_to=[]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert message in err and str(tmp_path) in err


def test_an_empty_prompt_without_bos_is_refused_naming_its_line(tiny_model):
    """A tokenizer that adds no BOS turns an empty prompt into no tokens at all: nothing for the response's
    first token to be predicted from (it was an IndexError in the batch layout)."""
    _, tok = load_pretrained(ModelConfig(name_or_path=str(tiny_model)))
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # no BOS, as GPT-2's
    cfg = build_config(DPOConfig, None, {"model.name_or_path": "m", "data.train": "x"}, [])
    units = pair_units([parse_record(r, criteria_settings(cfg)) for r in records(
        {"prompt": "red", "chosen": "blue", "rejected": "cat"}, {"prompt": "", "chosen": "blue", "rejected": "cat"})],
        cfg)
    with pytest.raises(UserError, match=r"^fb.jsonl:2: field 'prompt': empty"):
        encode_units(units, tok, cfg, Counter(), kto=False)


def test_truncation_keeps_prompt_end_and_counts_cut_responses(tiny_model, tmp_path):
    _, tok = load_pretrained(ModelConfig(name_or_path=str(tiny_model)))
    cfg = build_config(DPOConfig, None, {"model.name_or_path": "m", "data.train": "x"},
                       ["data.max_seq_len=12", "data.max_prompt_len=4"])
    units = pair_units([parse_record(r, criteria_settings(cfg)) for r in records(
        {"prompt": "red blue green cat dog bird", "chosen": "red blue green cat dog bird red blue green",
         "rejected": "red"})], cfg)
    stats: Counter = Counter()
    (e,) = encode_units(units, tok, cfg, stats, kto=False)
    full_prompt = tok("red blue green cat dog bird")["input_ids"]
    assert e.prompt_ids == full_prompt[-4:]
    assert len(e.prompt_ids) + len(e.response_ids[0]) == 12 and e.response_ids[1][-1] == tok.eos_token_id
    assert stats["responses_truncated"] == 1
