"""`algorithm: dpo` in the pipeline: a round is collect -> label -> DPO on all feedback so far -> eval, and
PPO and DPO rounds chain (each round starts from the previous round's policy)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from alignloop.config import dump_config
from alignloop.demo import TINY, pipeline_config, prepare
from alignloop.errors import UserError
from alignloop.pipeline import load_pipeline, plan, run_pipeline

os.environ.setdefault("ALIGNLOOP_ARGON2", "cheap")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("world")
    yield prepare(root, TINY, seed=0, model_name=None)
    torch.set_num_threads(before)


def write_pipeline(world, tmp_path: Path, **changes) -> Path:
    data, base = world
    cfg = pipeline_config(tmp_path / "run", data, base, TINY, seed=0)
    cfg.ppo["ppo"]["steps"] = 4
    cfg.dpo = {"dpo": {"beta": 0.1}, "train": {"lr": 1e-3, "epochs": 1, "batch_size": 4, "report_to": []}}
    for key, value in changes.items():
        setattr(cfg, key, value)
    path = tmp_path / "pipeline.yaml"
    dump_config(cfg, path)
    return path


def test_plan_mixes_ppo_and_dpo_rounds(world, tmp_path):
    path = write_pipeline(world, tmp_path, rounds=3, round_overrides={2: {"algorithm": "dpo",
                                                                          "dpo": {"dpo": {"loss": "ipo"}}}})
    stages = plan(load_pipeline(path))
    root = tmp_path / "run"
    assert [s.name for s in stages] == [
        "sft", "round-1/collect", "round-1/label", "round-1/rm", "round-1/ppo", "round-1/eval",
        "round-2/collect", "round-2/label", "round-2/dpo", "round-2/eval",
        "round-3/collect", "round-3/label", "round-3/rm", "round-3/ppo", "round-3/eval"]
    by_name = {s.name: s.config for s in stages}
    dpo = by_name["round-2/dpo"]
    # round 2 starts from round 1's PPO policy (also its reference), trains on all feedback so far
    assert by_name["round-2/collect"] == root / "round-1" / "ppo" / "model"
    assert dpo.model.name_or_path == str(root / "round-1" / "ppo" / "model") and dpo.dpo.loss == "ipo"
    assert dpo.data.train == str(root / "round-2" / "dpo" / "feedback.jsonl")
    assert by_name["round-2/eval"].policy == str(root / "round-2" / "dpo" / "model")
    assert by_name["round-2/eval"].reward_model is None
    # round 3 continues from the DPO policy
    assert by_name["round-3/ppo"].model.name_or_path == str(root / "round-2" / "dpo" / "model")
    with pytest.raises(UserError, match="round_overrides.2.algorithm: 'sft' is not one of ppo, dpo"):
        load_pipeline(path, ["round_overrides.2.algorithm=sft"])
    with pytest.raises(UserError, match="algorithm"):
        load_pipeline(path, ["algorithm=grpo"])


@pytest.mark.slow(seconds=10)
def test_a_dpo_round_trains_on_the_round_feedback_and_is_evaluated(world, tmp_path):
    path = write_pipeline(world, tmp_path, rounds=1, algorithm="dpo")
    run_pipeline(load_pipeline(path))
    root = tmp_path / "run" / "round-1"
    finished = json.loads((root / "dpo" / "FINISHED").read_text())
    assert finished["stage"] == "round-1/dpo" and finished["records"] > 0
    ev = json.loads((root / "dpo" / "eval.json").read_text())
    assert ev["loss"] == "sigmoid" and ev["validation"]["units"] > 0 and "test" in ev  # gold-ordered test pairs
    assert (root / "eval" / "FINISHED").is_file() and not (root / "rm").exists()


def test_demo_dpo_variant_plans_dpo_rounds(world, tmp_path):
    data, base = world
    cfg = pipeline_config(tmp_path / "run", data, base, TINY, seed=0, algorithm="dpo")
    names = [s.name for s in plan(cfg)]
    assert names == ["sft", "round-1/collect", "round-1/label", "round-1/dpo", "round-1/eval",
                     "round-2/collect", "round-2/label", "round-2/dpo", "round-2/eval"]
    ppo_demo = pipeline_config(tmp_path / "run", data, base, TINY, seed=0)
    assert ppo_demo.algorithm == "ppo" and ppo_demo.dpo == {}  # the PPO demo's config is unchanged
