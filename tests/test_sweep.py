"""alignloop sweep: Optuna trials over an SFT config, resumable from SQLite, best config trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import alignloop.sweep as sweep_module
from alignloop.cli import main
from test_classification import FAST_TRAIN, generated_reviews, write_config, write_jsonl


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from alignloop.models.tiny import build_tiny_model

    texts = [r["text"] for r in generated_reviews(200, 0)]
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", texts, arch="llama", vocab_size=300,
                            hidden=32, layers=1, heads=2)


def test_sweep_resumes_after_interruption_and_best_config_trains(tmp_path, tiny_model, monkeypatch, capsys):
    import optuna

    train = write_jsonl(tmp_path / "train.jsonl", generated_reviews(320, 1))
    cfg = write_config(tmp_path / "cls.yaml", {
        "task": "classification", "output_dir": str(tmp_path / "cls"), "model": {"name_or_path": str(tiny_model)},
        "data": {"train": str(train), "max_seq_len": 24, "split": {"validation": 0.2}},
        "train": {**FAST_TRAIN, "metric": "eval_accuracy"},
    })
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
                                     "train.batch_size": {"type": "categorical", "choices": [16, 32]}}))
    sweep = tmp_path / "sweep"
    args = ["sweep", "-c", str(cfg), "--trials", "3", "--space", str(space), "--output", str(sweep)]

    real_run = sweep_module.run_supervised
    calls: list[str] = []

    def interrupted_on_third(c, overwrite=False, on_eval=None):
        calls.append(c.output_dir)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the third trial
        return real_run(c, overwrite, on_eval)

    monkeypatch.setattr(sweep_module, "run_supervised", interrupted_on_third)
    assert main(args) == 130
    study = optuna.load_study(study_name="alignloop", storage=f"sqlite:///{sweep / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]
    finished = {p: (p / "FINISHED").stat().st_mtime_ns for p in sorted(sweep.glob("trial-*")) if
                (p / "FINISHED").exists()}
    assert len(finished) == 2

    calls.clear()
    monkeypatch.setattr(sweep_module, "run_supervised", lambda c, overwrite=False, on_eval=None:
                        calls.append(c.output_dir) or real_run(c, overwrite, on_eval))
    assert main(args) == 0
    assert len(calls) == 1  # only the missing trial ran; the two finished ones were kept
    assert {p: (p / "FINISHED").stat().st_mtime_ns for p in finished} == finished
    out = capsys.readouterr().out
    assert "eval_accuracy" in out and out.count("complete") == 3 and "best trial" in out

    study = optuna.load_study(study_name="alignloop", storage=f"sqlite:///{sweep / 'study.db'}")
    best = yaml.safe_load((sweep / "best.yaml").read_text())
    assert best["train"]["lr"] == study.best_params["train.lr"]
    assert best["train"]["batch_size"] == study.best_params["train.batch_size"]
    assert main(["sft", "-c", str(sweep / "best.yaml")]) == 0
    ev = json.loads((Path(best["output_dir"]) / "eval.json").read_text())
    assert ev["validation"]["accuracy"] == pytest.approx(study.best_value)  # same values, same seed, same result


def test_bad_search_space_is_one_line(tmp_path, capsys, tiny_model):
    train = write_jsonl(tmp_path / "train.jsonl", generated_reviews(40, 1))
    cfg = write_config(tmp_path / "cls.yaml", {"task": "classification", "model": {"name_or_path": str(tiny_model)},
                                               "data": {"train": str(train)}, "train": {"metric": "eval_accuracy"}})
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3}}))
    assert main(["sweep", "-c", str(cfg), "--trials", "2", "--space", str(space),
                 "--output", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "search space key 'train.learning_rate'" in err and "unknown key" in err


def test_hopeless_trial_is_pruned(tmp_path, tiny_model):
    import optuna

    from alignloop.config import SFTConfig
    from alignloop.sweep import Param, run_sweep

    train = write_jsonl(tmp_path / "train.jsonl", generated_reviews(320, 1))
    cfg = SFTConfig.model_validate({
        "task": "classification", "output_dir": str(tmp_path / "cls"), "model": {"name_or_path": str(tiny_model)},
        "data": {"train": str(train), "max_seq_len": 24, "split": {"validation": 0.2}},
        "train": {**FAST_TRAIN, "lr": 3e-3, "eval_steps": 2, "metric": "eval_loss"},
    })
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    study = optuna.create_study(study_name="alignloop", storage=f"sqlite:///{sweep / 'study.db'}")
    for lr in (3e-3, 3e-3, 1e-9):  # the third learns nothing: its loss stays above the median
        study.enqueue_trial({"train.lr": lr})
    study, _ = run_sweep(cfg, 3, {"train.lr": Param(type="float", low=1e-9, high=1e-2, log=True)}, sweep)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert not (sweep / "trial-002" / "FINISHED").exists()  # stopped early, never finished
    assert study.best_trial.number in (0, 1)
