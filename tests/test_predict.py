"""alignloop predict: the trained model's answers for a file, for every SFT task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignloop.cli import main
from test_classification import FAST_TRAIN, generated_reviews, write_config, write_jsonl
from test_tagging import generated_sentences


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from alignloop.models.tiny import build_tiny_model

    texts = [r["text"] for r in generated_reviews(150, 0)] + [" ".join(r["tokens"]) for r in
                                                             generated_sentences(150, 0)]
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", texts, arch="llama", vocab_size=300,
                            hidden=32, layers=1, heads=2)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def train_run(tmp_path: Path, tiny_model: Path, task: str, train: Path, test: Path, **data) -> Path:
    cfg = write_config(tmp_path / f"{task}.yaml", {
        "task": task, "output_dir": str(tmp_path / task), "model": {"name_or_path": str(tiny_model)},
        "data": {"train": str(train), "test": str(test), "max_seq_len": 32, **data},
        "train": {**FAST_TRAIN, "lr": 3e-3, "metric": "eval_loss"},
    })
    assert main(["sft", "-c", str(cfg)]) == 0
    return tmp_path / task


def test_predict_classification_with_int_labels_matches_the_run(tmp_path, tiny_model, capsys):
    rows = [{**r, "label": int(r["label"] == "positive")} for r in generated_reviews(200, 1)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    test = write_jsonl(tmp_path / "test.jsonl", [{**r, "label": int(r["label"] == "positive")}
                                                 for r in generated_reviews(30, 2)])
    run = train_run(tmp_path, tiny_model, "classification", train, test)

    unlabelled = write_jsonl(tmp_path / "new.jsonl", [{"id": i, "text": r["text"]}
                                                      for i, r in enumerate(read_jsonl(test))])
    out = tmp_path / "pred.jsonl"
    assert main(["predict", "--model", str(run / "model"), "--data", str(unlabelled), "--output", str(out)]) == 0
    got = read_jsonl(out)
    expected = read_jsonl(run / "predictions.test.jsonl")
    assert [g["id"] for g in got] == list(range(30))  # input fields are kept, order too
    assert all(isinstance(g["prediction"], int) for g in got)  # integer labels come back as integers
    assert [str(g["prediction"]) for g in got] == [e["prediction"] for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert g["probabilities"] == pytest.approx(e["probabilities"], abs=1e-5)


def test_predict_tagging_from_conll_matches_the_run(tmp_path, tiny_model):
    train = write_jsonl(tmp_path / "train.jsonl", generated_sentences(200, 1))
    test_rows = generated_sentences(20, 2)
    test = write_jsonl(tmp_path / "test.jsonl", test_rows)
    run = train_run(tmp_path, tiny_model, "tagging", train, test)

    conll = tmp_path / "test.conll"
    conll.write_text("\n\n".join("\n".join(f"{t}\t{g}" for t, g in zip(r["tokens"], r["tags"], strict=True))
                                 for r in test_rows) + "\n")
    out = tmp_path / "tags.jsonl"
    assert main(["predict", "--model", str(run / "model"), "--data", str(conll), "--output", str(out)]) == 0
    got = read_jsonl(out)
    expected = read_jsonl(run / "predictions.test.jsonl")
    assert [g["tokens"] for g in got] == [r["tokens"] for r in test_rows]
    assert [g["predicted_tags"] for g in got] == [e["predicted_tags"] for e in expected]


def test_predict_causal_lm_greedy_and_seeded_sampling(tmp_path, tiny_model):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "the film was"},
        {"messages": [{"role": "user", "content": "we met in"}, {"role": "assistant", "content": "Paris"}]},
    ])

    def generate(name: str, *flags: str) -> list[dict]:
        out = tmp_path / name
        assert main(["predict", "--model", str(tiny_model), "--data", str(prompts), "--output", str(out),
                     "--max-new-tokens", "6", *flags]) == 0
        return read_jsonl(out)

    greedy = generate("g1.jsonl")
    assert len(greedy) == 2 and all(isinstance(r["generation"], str) for r in greedy)
    assert generate("g2.jsonl") == greedy
    sampled = generate("s1.jsonl", "--temperature", "1.0", "--top-p", "0.9", "--seed", "3")
    assert generate("s2.jsonl", "--temperature", "1.0", "--top-p", "0.9", "--seed", "3") == sampled


def test_predict_input_errors_are_one_line(tmp_path, tiny_model, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"question": "no prompt"}])
    assert main(["predict", "--model", str(tiny_model), "--data", str(bad), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad}:2: field 'prompt'" in err
