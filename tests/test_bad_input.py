"""Bad input gets one clear line naming the problem, a non-zero exit, no traceback, no finished run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from alignloop.cli import main
from conftest import repeat_task, write_jsonl


def run_cli(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()  # drop what fixtures printed
    code = main(["-q", *args])
    err = capsys.readouterr().err.strip()
    return code, err


def sft(model, data, out, *extra):
    return ["sft", "--model", str(model), "--data", str(data), "--output", str(out), "train.report_to=[]", *extra]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', ":2: malformed JSON"),
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "only a prompt"}\n', ":2: field 'completion' is missing"),
        ('{"prompt": "a", "completion": 7}\n', ":1: field 'completion': Input should be a valid string (got int)"),
        ("", "no records (the file is empty)"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}\n', ":1: field 'messages.0.role'"),
        ('{"question": "a"}\n', ":1: an SFT record needs"),
    ],
)
def test_bad_data_lines(capsys, tiny_model, tmp_path, content, expected):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    code, err = run_cli(capsys, *sft(tiny_model, data, tmp_path / "run"))
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert str(data) in err and expected in err, err
    assert not (tmp_path / "run" / "FINISHED").exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lrr=0.1", "unknown key 'train.lrr'"),
        ("train.lr=-1", "train.lr: Input should be greater than 0"),
        ("train.batch_size=many", "train.batch_size: Input should be a valid integer"),
        ("data.split.validation=0.7 data.split.test=0.5", "validation + test fractions must be below 1"),
    ],
)
def test_bad_config_values(capsys, tiny_model, sft_data, tmp_path, override, expected):
    code, err = run_cli(capsys, *sft(tiny_model, sft_data, tmp_path / "run", *override.split()))
    assert code == 2
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_yaml_file(capsys, tiny_model, sft_data, tmp_path):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model:\n  name_or_path: {tiny_model}\ndata:\n  train: {sft_data}\ntrain:\n  epochs: 1\n  bogus: 3\n")
    code, err = run_cli(capsys, "sft", "-c", str(cfg), "--output", str(tmp_path / "run"))
    assert code == 2 and "unknown key 'train.bogus'" in err and str(cfg) in err


def test_missing_model_path(capsys, sft_data, tmp_path):
    code, err = run_cli(capsys, *sft(tmp_path / "no" / "such" / "model", sft_data, tmp_path / "run"))
    assert code == 2 and "model path does not exist" in err, err
    assert not (tmp_path / "run").exists()


def test_finished_run_is_not_overwritten_silently(capsys, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", repeat_task(40))
    args = sft(tiny_model, data, tmp_path / "run", "train.max_steps=2", "train.batch_size=8")
    assert run_cli(capsys, *args)[0] == 0
    code, err = run_cli(capsys, *args)
    assert code == 2 and "already holds a finished run" in err


def test_real_process_exit_code_and_no_traceback(tiny_model, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "x", "completion": "y"}\nnot json\n')
    proc = subprocess.run([sys.executable, "-m", "alignloop", "sft", "--model", str(tiny_model), "--data", str(data),
                           "--output", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(f"{data}:2: malformed JSON (Expecting value at column 1)")


def test_unreachable_hub_id_is_one_line(capsys, sft_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run_cli(capsys, *sft("no-such-org/no-such-model", sft_data, tmp_path / "run"))
    assert code == 2 and len(err.splitlines()) == 1
    assert "cannot load model 'no-such-org/no-such-model'" in err
    assert not (tmp_path / "run" / "FINISHED").exists()


def test_qlora_without_a_gpu_is_refused_clearly(capsys, tiny_model, sft_data, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, err = run_cli(capsys, *sft(tiny_model, sft_data, tmp_path / "run", "model.adapter=qlora"))
    assert code == 2 and "qlora needs a CUDA GPU" in err
