"""The training layer: resume compares the config with the stored one (changed mutable settings are applied
and named in one warning, any other change stops the run), and PPO runs through accelerate in bf16."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from alignloop.config import PPOConfig, SFTConfig, TrainConfig, build_config
from alignloop.errors import TrainingDiverged, UserError
from alignloop.models.tiny import build_tiny_model
from alignloop.runs import read_metrics
from alignloop.train.ppo import run_ppo
from alignloop.train.sft import run_sft
from alignloop.training.accelerator import make_accelerator
from alignloop.training.resume import config_changes

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

TESTS = Path(__file__).resolve().parent
WORDS = "red blue green cat dog bird runs jumps sleeps big small happy sad tree river stone".split()


def test_config_changes_split_mutable_from_immutable_keys():
    stored = {"output_dir": "a", "train": {"lr": 1e-3, "seed": 1, "report_to": ["tensorboard"]},
              "model": {"name_or_path": "m", "lora": {"r": 8}}, "ppo": {"kl_target": None}}
    new = {"output_dir": "a", "train": {"lr": 2e-3, "seed": 1, "report_to": []},
           "model": {"name_or_path": "m2", "lora": {"r": 8}}, "ppo": {"kl_target": 0.5}, "extra": 1}
    mutable = {"train.lr", "train.report_to", "ppo"}  # a listed parent makes its children mutable
    assert config_changes(stored, new, mutable) == (["ppo.kl_target", "train.lr", "train.report_to"],
                                                    ["extra", "model.name_or_path"])
    assert config_changes(stored, stored, mutable) == ([], [])
    # a key only one side has differs even from None
    assert config_changes({"a": None}, {}, set()) == ([], ["a"])


class Interrupted(Exception):
    pass


def sft_config(model: Path, data: Path, out: Path, *overrides: str) -> SFTConfig:
    base = ["train.lr=3e-3", "train.batch_size=16", "train.log_steps=1", "train.report_to=[]", "data.max_seq_len=64",
            "train.max_steps=6", "train.eval_steps=2", "train.save_steps=2", "train.schedule=constant"]
    return build_config(SFTConfig, None, {"model.name_or_path": str(model), "data.train": str(data),
                                          "output_dir": str(out)}, base + list(overrides))


def interrupt_at(step: int):
    def on_eval(at: int, _metrics: dict) -> None:
        if at == step:
            raise Interrupted  # as if the process died before this step's checkpoint
    return on_eval


def test_sft_resume_applies_a_new_lr_and_refuses_a_new_model_or_data(tiny_model, sft_data, tmp_path, caplog):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        run_sft(sft_config(tiny_model, sft_data, out), on_eval=interrupt_at(4))
    assert (out / "checkpoints" / "step-0000002").is_dir() and not (out / "FINISHED").exists()

    other_data = tmp_path / "other.jsonl"
    other_data.write_text(sft_data.read_text())
    other_model = tmp_path / "other-model"
    other_model.symlink_to(tiny_model, target_is_directory=True)
    for key, value in (("model.name_or_path", other_model), ("data.train", other_data)):
        with pytest.raises(UserError) as err:
            run_sft(sft_config(tiny_model, sft_data, out, f"{key}={value}"))
        message = str(err.value)
        assert "\n" not in message and key in message and "--overwrite" in message, message

    with caplog.at_level("WARNING", logger="alignloop.training.resume"):
        run_sft(sft_config(tiny_model, sft_data, out, "train.lr=1e-4", "train.max_steps=8"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "train.lr" in warnings[0] and "train.max_steps" in warnings[0], warnings
    lrs = {m["step"]: m["lr"] for m in read_metrics(out / "metrics.jsonl") if "lr" in m}
    assert sorted(lrs) == list(range(1, 9))  # lines past the checkpoint were dropped, then steps 3-8 appended
    assert [lrs[s] for s in (1, 2)] == [3e-3, 3e-3]
    assert all(lrs[s] == pytest.approx(1e-4) for s in range(3, 9)), lrs
    assert (out / "FINISHED").exists()
    assert "lr: 0.0001" in (out / "config.yaml").read_text()


_poison = {"calls": 0, "after": None}


def a_share(prompts, responses, **_):
    """Share of "a" characters; NaN once it has been called ``_poison["after"]`` times (a run that breaks)."""
    _poison["calls"] += 1
    broken = _poison["after"] is not None and _poison["calls"] > _poison["after"]
    return [float("nan") if broken else 4.0 * r.count("a") / max(len(r), 1) for r in responses]


@pytest.fixture(scope="module")
def ppo_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_training")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(200)]
    policy = build_tiny_model(root / "policy", texts, vocab_size=300, hidden=32, layers=2, heads=2)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(3))}) + "\n"
                               for _ in range(40)))
    return root, policy, prompts


def ppo_config(setup, out: str, *overrides: str) -> PPOConfig:
    root, policy, prompts = setup
    base = ["reward.functions=[test_training:a_share]", "ppo.critic=policy_head", "generation.max_new_tokens=6",
            "ppo.rollout_size=8", "ppo.mini_batch_size=4", "ppo.micro_batch_size=2", "ppo.ppo_epochs=2",
            "ppo.steps=4", "train.lr=3e-3", "train.save_steps=2", "train.report_to=[]", "data.eval_fraction=0.2"]
    return build_config(PPOConfig, None, {"model.name_or_path": str(policy), "data.train": str(prompts),
                                          "output_dir": str(root / out)}, base + list(overrides))


def test_ppo_resume_applies_a_new_kl_target(ppo_setup, caplog):
    root = ppo_setup[0]
    _poison.update(calls=0, after=3)  # the held-out evaluation and two steps, then NaN rewards
    with pytest.raises(TrainingDiverged):
        run_ppo(ppo_config(ppo_setup, "kl", "ppo.kl_target=1.0"))
    _poison["after"] = None
    state = json.loads((root / "kl" / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state["kl_controller"]["target"] == 1.0

    with pytest.raises(UserError, match="generation.max_new_tokens"):
        run_ppo(ppo_config(ppo_setup, "kl", "ppo.kl_target=1.0", "generation.max_new_tokens=7"))
    with caplog.at_level("WARNING", logger="alignloop.training.resume"):
        run_ppo(ppo_config(ppo_setup, "kl", "ppo.kl_target=0.25", "ppo.kl_horizon=500"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "resuming" in r.getMessage()]
    assert len(warnings) == 1 and "ppo.kl_target" in warnings[0] and "ppo.kl_horizon" in warnings[0], warnings
    final = json.loads((root / "kl" / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert final["kl_controller"]["target"] == 0.25 and final["kl_controller"]["horizon"] == 500
    assert (root / "kl" / "FINISHED").exists()


def test_ppo_trains_in_bf16_on_cpu_with_finite_metrics(ppo_setup):
    # A process holds one accelerator state (its mixed precision fixed at the first Accelerator): run the CLI.
    root, policy, prompts = ppo_setup
    cfg = ppo_config(ppo_setup, "bf16", "train.mixed_precision=bf16")
    config = root / "bf16.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "alignloop", "-q", "ppo", "-c", str(config)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_metrics(root / "bf16" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for k, v in r.items():
            if isinstance(v, float):
                assert math.isfinite(v), (r["step"], k, v)
    assert {"policy_loss", "value_loss", "kl", "entropy"} <= rows[-1].keys()
    assert (root / "bf16" / "FINISHED").exists()
    evaluation = json.loads((root / "bf16" / "eval.json").read_text())
    assert math.isfinite(evaluation["reward_after"])


def test_trackers_named_in_report_to_receive_the_logged_steps(tiny_model, sft_data, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    run_sft(sft_config(tiny_model, sft_data, out, "train.max_steps=2", "train.report_to=[tensorboard]"))
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 0


def test_stages_in_one_process_each_get_their_own_precision():
    """A pipeline runs its stages in one process: SFT and PPO in bf16, the reward model in fp32. accelerate
    refused the second precision ("AcceleratorState has already been initialized")."""
    for precision, dtype in (("bf16", torch.bfloat16), ("no", torch.float32), ("bf16", torch.bfloat16)):
        acc = make_accelerator(TrainConfig(mixed_precision=precision))
        with acc.autocast():
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype, precision
