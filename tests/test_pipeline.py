"""`alignloop run`: stages in order, SIGKILL mid-PPO then resume without redoing finished stages, `--from`,
and human mode stopping for labels. The world is the demo's at its tiniest (plumbing, not learning)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alignloop.cli import main
from alignloop.config import dump_config
from alignloop.demo import TINY, pipeline_config, prepare
from alignloop.feedback.rounds import simulated_users
from alignloop.feedback.web.server import FeedbackServer
from alignloop.pipeline import feedback_db, load_pipeline, plan
from alignloop.runs import read_metrics

os.environ.setdefault("ALIGNLOOP_ARGON2", "cheap")
SIZE = TINY


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("world")
    yield prepare(root, SIZE, seed=0, model_name=None)
    torch.set_num_threads(before)


def write_pipeline(world, tmp_path: Path, **changes) -> Path:
    data, base = world
    cfg = pipeline_config(tmp_path / "run", data, base, SIZE, seed=0)
    cfg.rounds = 1
    cfg.ppo["ppo"]["steps"] = 6
    cfg.ppo["train"]["save_steps"] = 2
    for key, value in changes.items():
        setattr(cfg, key, value)
    path = tmp_path / "pipeline.yaml"
    dump_config(cfg, path)
    return path


def stage_log(root: Path) -> list[dict]:
    return read_metrics(root / "stages.jsonl")


def finished_mtimes(cfg) -> dict[str, int]:
    return {s.name: (s.folder / "FINISHED").stat().st_mtime_ns for s in plan(cfg) if (s.folder / "FINISHED").is_file()}


def test_runner_order_sigkill_resume_and_from(world, tmp_path, caplog):
    yaml_path = write_pipeline(world, tmp_path)
    cfg = load_pipeline(yaml_path)
    root = Path(cfg.output_dir)
    names = [s.name for s in plan(cfg)]
    assert names == ["sft", "round-1/collect", "round-1/label", "round-1/rm", "round-1/ppo", "round-1/eval"]

    # ---- run in a child process and SIGKILL it once PPO has written a checkpoint
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "alignloop", "-q", "run", str(yaml_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = root / "round-1" / "ppo" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (ckpts.is_dir() and any(ckpts.glob("step-*"))):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "PPO never wrote a checkpoint"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = finished_mtimes(cfg)
    assert list(before) == names[:4]  # everything up to rm finished, PPO did not
    log = stage_log(root)
    assert [e["stage"] for e in log if e["event"] == "start"] == names[:5]

    # ---- the same command again: finished stages are skipped, PPO resumes from its checkpoint
    caplog.set_level("INFO", logger="alignloop.train.ppo")
    assert main(["run", str(yaml_path)]) == 0
    after = finished_mtimes(cfg)
    assert list(after) == names
    assert all(after[n] == before[n] for n in names[:4]), "a finished stage was redone"
    assert any("resuming from" in r.getMessage() for r in caplog.records)
    rerun = stage_log(root)[len(log):]
    assert [e["stage"] for e in rerun if e["event"] == "skip"] == names[:4]
    assert [e["stage"] for e in rerun if e["event"] == "start"] == names[4:]
    steps = [m["step"] for m in read_metrics(root / "round-1" / "ppo" / "metrics.jsonl")]
    assert steps == list(range(1, 7))  # every step once: nothing lost, nothing logged twice
    assert (root / "report.html").is_file()

    # ---- --from reruns the named stage and everything after it, nothing before
    assert main(["run", str(yaml_path), "--from", "round-1/rm"]) == 0
    again = finished_mtimes(cfg)
    assert all(again[n] == after[n] for n in names[:3])
    assert all(again[n] > after[n] for n in names[3:])
    assert main(["run", str(yaml_path), "--from", "round-9/rm"]) == 2  # a one-line error naming the stages


def test_human_mode_stops_for_labels_and_picks_up(world, tmp_path, capsys):
    from alignloop.data.synthetic import make_annotators
    from alignloop.feedback.simulate import AnnotatorClient, run_annotators

    yaml_path = write_pipeline(world, tmp_path)
    cfg = load_pipeline(yaml_path, ["feedback.mode=human", "feedback.label_quota=3", "feedback.url=http://labels.example:8000"])
    assert main(["run", str(yaml_path), "feedback.mode=human", "feedback.label_quota=3",
                 "feedback.url=http://labels.example:8000"]) == 3
    err = capsys.readouterr().err
    assert "http://labels.example:8000" in err and "3 more needed" in err
    root = Path(cfg.output_dir)
    assert (root / "round-1" / "collect" / "FINISHED").is_file() and not (root / "round-1" / "rm").exists()

    # People label (here: simulated ones through the real HTTP API), then the same command continues.
    db = feedback_db(cfg)
    password = simulated_users(db, {"alice": "annotator"})
    from alignloop.data.synthetic import gold_ratings

    with FeedbackServer(db) as server:
        (alice,) = make_annotators(["alice"], gold_ratings)
        run_annotators([AnnotatorClient(server.url, password, alice)], "round-1", max_labels=3)
    assert main(["run", str(yaml_path), "feedback.mode=human", "feedback.label_quota=3"]) == 0
    assert json.loads((root / "round-1" / "label" / "FINISHED").read_text())["labels"] == 3
    assert (root / "round-1" / "eval" / "FINISHED").is_file()


def test_round_overrides_change_one_round_and_bad_ones_name_the_round(world, tmp_path):
    from alignloop.errors import UserError

    yaml_path = write_pipeline(world, tmp_path, rounds=2, round_overrides={2: {"ppo": {"ppo": {"steps": 9}},
                                                                               "rm": {"train": {"lr": 5e-4}}}})
    stages = {s.name: s.config for s in plan(load_pipeline(yaml_path))}
    assert stages["round-1/ppo"].ppo.steps == 6 and stages["round-2/ppo"].ppo.steps == 9
    assert stages["round-2/ppo"].ppo.rollout_size == stages["round-1/ppo"].ppo.rollout_size  # the rest is kept
    assert stages["round-1/rm"].train.lr == 1e-3 and stages["round-2/rm"].train.lr == 5e-4
    with pytest.raises(UserError, match="round_overrides: round 3, but the pipeline has rounds 1-2"):
        load_pipeline(yaml_path, ["round_overrides.3.ppo.ppo.steps=4"])
    with pytest.raises(UserError, match=r"ppo \(round 2\).*nonsense"):
        load_pipeline(yaml_path, ["round_overrides.2.ppo.ppo.nonsense=4"])
