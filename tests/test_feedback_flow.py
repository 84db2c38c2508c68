"""The round trip: `alignloop collect` fills a round from a model; simulated annotators label it through
the HTTP API of the real server; `alignloop feedback export` writes what `alignloop rm` trains on."""

from __future__ import annotations

import json
import random

import pytest
import torch

import reward_data as rd
from alignloop.cli import main
from alignloop.data.synthetic import Annotator, make_annotators
from alignloop.errors import UserError
from alignloop.feedback import tasks
from alignloop.feedback.db import Candidate, Label, Prompt, open_db
from alignloop.feedback.simulate import AnnotatorClient, run_annotators
from alignloop.models.tiny import build_tiny_model
from feedback_fixtures import *  # noqa: F403  (fixtures)
from feedback_fixtures import PASSWORD, create_users


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_tiny_model(tmp_path_factory.mktemp("fb-tiny") / "model", rd.texts(), vocab_size=300, hidden=32,
                           layers=2, heads=4)
    torch.set_num_threads(before)


def test_collect_generates_k_candidates_with_settings(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "Tell me about boats:"}, {"prompt": "Tell me about bread:"},
        {"messages": [{"role": "user", "content": "Tell me about music:"}]}]))
    db = str(tmp_path / "fb.db")
    assert main(["collect", "--model", str(tiny_model), "--prompts", str(prompts), "--k", "3", "--round", "c1",
                 "--db", db, "--max-new-tokens", "12", "--temperature", "0.9", "--seed", "3"]) == 0
    with open_db(db)() as s:
        rnd = tasks.get_round(s, "c1")
        cands = s.query(Candidate).all()
        assert len(cands) == 9 and {c.model for c in cands} == {str(tiny_model)}
        g = cands[0].generation
        # The flags not given take the one default set every stage samples with (SamplingConfig).
        assert g == {"temperature": 0.9, "top_p": 1.0, "top_k": 0, "max_new_tokens": 12, "stop_on_eos": True,
                     "batch_size": 16, "seed": 3, "backend": "transformers", "precision": "auto", "k": 3,
                     "sample": g["sample"]}
        per_prompt = {}
        for c in cands:
            per_prompt.setdefault(c.prompt.text, []).append(c.text)
        assert "user: Tell me about music:" in per_prompt
        # The chat prompt keeps its messages (for exports); plain prompts have none.
        stored = {p.text: p.messages for p in s.query(Prompt)}
        assert stored["user: Tell me about music:"] == [{"role": "user", "content": "Tell me about music:"}]
        assert stored["Tell me about boats:"] is None
        # Sampling: the K candidates of a prompt differ.
        assert all(len(set(texts)) > 1 for texts in per_prompt.values())
        assert rnd.criteria[0]["name"] == "relevance"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no prompt"}\n')
    assert main(["collect", "--model", str(tiny_model), "--prompts", str(bad), "--round", "c1", "--db", db]) == 2


def test_simulated_annotators_rank_by_their_criterion_weights():
    # Noise-free: "a" is far more relevant, "b" a little more creative. Counted equally b wins (4.5 vs 4.0);
    # weighted 0.8 / 0.2, a wins (5.8 vs 3.6).
    judgement = {"a": {"relevance": 7.0, "creativity": 1.0}, "b": {"relevance": 3.0, "creativity": 6.0}}
    task = {"prompt": "p", "criteria": [{"name": c, "min": 1, "max": 7} for c in ("relevance", "creativity")],
            "candidates": [{"id": 10, "text": "a"}, {"id": 11, "text": "b"}]}

    def annotator(weights, skip_rate=0.0):
        person = Annotator("u", lambda p, r: judgement[r], noise=0.0, weights=weights, skip_rate=skip_rate)
        return AnnotatorClient("http://unused", "pw", person)

    assert annotator(None).label_payload(task)["ranking"] == [11, 10]
    labels = annotator({"relevance": 0.8, "creativity": 0.2}).label_payload(task)
    assert labels["ranking"] == [10, 11]
    assert labels["ratings"] == {10: {"relevance": 7.0, "creativity": 1.0}, 11: {"relevance": 3.0, "creativity": 6.0}}
    assert annotator(None, skip_rate=1.0).label_payload(task) == {"skip": True}
    with pytest.raises(UserError, match="'creativity'"):
        annotator({"relevance": 1.0}).label_payload(task)


def test_annotators_taking_turns_label_a_seeded_round_the_same_way_every_time(tmp_path, live_server_factory):
    rng = random.Random(2)
    items = [{"prompt": rd.prompt(rng), "responses": [rd.response(rng) for _ in range(3)]} for _ in range(12)]
    names = ["sim1", "sim2", "sim3"]

    def gold(prompt: str, response: str) -> dict[str, float]:
        return {c: 1.0 + 1.5 * rd.gold(response, c) for c in rd.CRITERION_WORDS}

    def labelled(run: str) -> list[tuple]:
        db_url = str(tmp_path / f"{run}.db")
        with open_db(db_url)() as db:
            rnd = tasks.create_round(db, "sim", [{"name": c, "min": 1, "max": 7} for c in rd.CRITERION_WORDS])
            tasks.add_items(db, rnd, items)
        create_users(db_url, dict.fromkeys(names, "annotator"))
        server = live_server_factory(db_url).start()
        # Different biases and noise per annotator: who labels which item shows in the labels.
        annotators = [AnnotatorClient(server.url, PASSWORD, a)
                      for a in make_annotators(names, gold, noise=1.0, bias_scale=1.0, seed=4)]
        assert run_annotators(annotators, "sim", max_labels=4, concurrent=False) == dict.fromkeys(names, 4)
        with open_db(db_url)() as db:
            # Fresh databases filled in the same order: the same ids for the same prompts and candidates.
            return sorted((lb.prompt_id, lb.user.username, lb.ranking,
                           sorted((r.candidate_id, r.criterion, r.value) for r in lb.ratings))
                          for lb in db.query(Label).all())

    first, second = labelled("a"), labelled("b")
    assert len(first) == 12 and {row[1] for row in first} == set(names)
    assert first == second


def total_gold(response: str) -> int:
    return sum(rd.gold(response, c) for c in rd.CRITERION_WORDS)


def held_out_pairs(n: int, seed: int) -> list[dict]:
    """Unseen pairs ordered by the simulated annotators' hidden judgement (all criteria together)."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        a, b = rd.response(rng), rd.response(rng)
        if total_gold(a) != total_gold(b):
            hi, lo = (a, b) if total_gold(a) > total_gold(b) else (b, a)
            out.append({"prompt": rd.prompt(rng), "chosen": hi, "rejected": lo})
    return out


@pytest.mark.slow
def test_simulated_annotators_export_feeds_alignloop_rm(tiny_model, tmp_path, live_server_factory):
    db_url = str(tmp_path / "fb.db")
    rng = random.Random(5)
    items = [{"prompt": rd.prompt(rng), "responses": [rd.response(rng) for _ in range(4)]} for _ in range(90)]
    with open_db(db_url)() as db:
        rnd = tasks.create_round(db, "sim", [{"name": c, "min": 1, "max": 7} for c in rd.CRITERION_WORDS],
                                 overlap=2)
        tasks.add_items(db, rnd, items)
    names = ["sim1", "sim2", "sim3"]
    create_users(db_url, dict.fromkeys(names, "annotator"))
    server = live_server_factory(db_url).start()

    def gold(prompt: str, response: str) -> dict[str, float]:
        return {c: 1.0 + 1.5 * rd.gold(response, c) for c in rd.CRITERION_WORDS}

    annotators = [AnnotatorClient(server.url, PASSWORD, a)
                  for a in make_annotators(names, gold, noise=0.3, bias_scale=0.3, seed=1)]
    done = run_annotators(annotators, "sim", max_labels=100)  # until the queue is empty
    assert sum(done.values()) == 180 and all(n > 0 for n in done.values())
    with open_db(db_url)() as db:
        assert db.query(Label).count() == 180  # every item labelled by exactly two annotators

    export = tmp_path / "rankings.jsonl"
    assert main(["feedback", "export", "--db", db_url, "--round", "sim", "--output", str(export)]) == 0
    records = [json.loads(x) for x in export.read_text().splitlines()]
    assert len(records) == 90
    test_pairs = rd.write_jsonl(tmp_path / "test.jsonl", held_out_pairs(100, seed=9))
    run = tmp_path / "rm"
    code = main(["-q", "rm", "--model", str(tiny_model), "--data", str(export), "--test-data", str(test_pairs),
                 "--output", str(run), "train.lr=3e-3", "train.batch_size=16", "train.report_to=[]", "train.epochs=3"])
    assert code == 0
    test = json.loads((run / "eval.json").read_text())["test"]
    # Trained only on what the simulated people said through the app, it ranks unseen pairs.
    assert test["accuracy"] >= 0.7, test
