"""`alignloop ppo` killed with SIGKILL after a checkpoint and rerun ends exactly where an uninterrupted run
does: same metrics (timings aside), same held-out reward, same weights. NaN stops with a clear message."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignloop.models.tiny import build_tiny_model
from alignloop.runs import read_metrics
from alignloop.train.ppo import TIMING_KEYS

TESTS = Path(__file__).resolve().parent
WORDS = "red blue green cat dog bird runs jumps sleeps big small happy sad tree river stone".split()
STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_resume")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(200)]
    policy = build_tiny_model(root / "policy", texts, vocab_size=300, hidden=32, layers=2, heads=2)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(3))}) + "\n"
                               for _ in range(40)))
    sft = root / "sft.jsonl"  # PPO-ptx data: its LM loss is mixed into the policy update
    sft.write_text("".join(json.dumps({"prompt": rng.choice(WORDS), "completion": " ".join(rng.sample(WORDS, 4))})
                           + "\n" for _ in range(20)))
    config = root / "ppo.yaml"
    config.write_text(f"""\
model: {{name_or_path: {policy}}}
data: {{train: {prompts}, eval_fraction: 0.2, ptx: {sft}}}
reward: {{functions: ["test_ppo_loop:a_share"]}}
generation: {{max_new_tokens: 6}}
ppo: {{steps: {STEPS}, rollout_size: 8, mini_batch_size: 4, micro_batch_size: 2, ppo_epochs: 2, critic: policy_head,
      kl_target: 1.0, ema_decay: 0.9, missing_eos_penalty: 0.5, ptx_coef: 0.1, ptx_batch_size: 2}}
train: {{lr: 0.003, save_steps: 2, report_to: [], sample_steps: 2}}
""")
    return root, config


def cli(config: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "alignloop", "-q", "ppo", "-c", str(config), "--output", str(out),
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_sigkill_then_resume_matches_uninterrupted_run(setup):
    root, config = setup
    full = cli(config, root / "full")
    killed = cli(config, root / "killed")
    latest = root / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, killed.communicate()[1][-2000:]
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (root / "killed" / "FINISHED").exists()
    resumed = cli(config, root / "killed")
    out_full, err_full = full.communicate(timeout=300)
    out_res, err_res = resumed.communicate(timeout=300)
    assert full.returncode == 0, err_full[-2000:]
    assert resumed.returncode == 0, err_res[-2000:]

    a, b = read_metrics(root / "full" / "metrics.jsonl"), read_metrics(root / "killed" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, STEPS + 1)) and "ptx_loss" in b[-1]
    assert comparable(a) == comparable(b)
    assert json.loads((root / "full" / "eval.json").read_text()) == json.loads(
        (root / "killed" / "eval.json").read_text())
    assert (root / "full" / "samples.jsonl").read_text() == (root / "killed" / "samples.jsonl").read_text()
    weights = [(root / r / "model" / "model.safetensors").read_bytes() for r in ("full", "killed")]
    assert weights[0] == weights[1]


def test_nan_reward_stops_with_clear_message_and_keeps_checkpoint(setup):
    from alignloop.config import PPOConfig, build_config
    from alignloop.errors import TrainingDiverged
    from alignloop.train.ppo import run_ppo

    root, config = setup
    nan_cfg = root / "nan.yaml"
    nan_cfg.write_text(config.read_text().replace("test_ppo_loop:a_share", "test_ppo_resume:nan_after_two"))
    _calls["n"] = 0
    cfg = build_config(PPOConfig, nan_cfg, {"output_dir": str(root / "nan")}, ["ppo.steps=4"])
    with pytest.raises(TrainingDiverged, match="diverged at step 3: the reward is NaN.*checkpoint is kept"):
        run_ppo(cfg)
    assert (root / "nan" / "checkpoints" / "step-0000002").is_dir()
    assert not (root / "nan" / "FINISHED").exists()


_calls = {"n": 0}


def nan_after_two(prompts, responses, **_):
    """Finite for the held-out evaluation and two training steps, then NaN."""
    _calls["n"] += 1
    return [float("nan") if _calls["n"] > 3 else 1.0 for _ in responses]
