"""train.micro_batch_tokens: a batch forwarded and backpropagated in pieces trains to the same weights.

The loss and the optimizer step average over every unit of a step however it is cut (training/fit.py), so
cutting a batch changes only how much memory its forward and backward hold at once.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import alignloop.training.fit as fit_module
import reward_data as rd
from alignloop.cli import main
from alignloop.models.tiny import build_tiny_model
from alignloop.runs import read_metrics
from alignloop.training.fit import micro_batches
from alignloop.training.resume import SUPERVISED_MUTABLE, config_changes
from test_resume_and_ddp import alignloop, sft_args, weights

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def pad_collate(rows: list[list[int]]) -> dict:
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "loss_units": sum(len(r) for r in rows), "n": len(rows)}


def test_cuts_a_batch_into_contiguous_runs_near_the_budget():
    batch = [[1] * n for n in (10, 9, 8, 8, 5, 3)]  # padded: 6 rows x 10 = 60 tokens
    whole = micro_batches([batch], pad_collate, None)
    assert [b["n"] for b in whole] == [6]
    pieces = micro_batches([batch], pad_collate, 20)  # ceil(60 / 20) = 3 runs of 2 rows
    assert [b["n"] for b in pieces] == [2, 2, 2]
    assert [tuple(b["input_ids"].shape) for b in pieces] == [(2, 10), (2, 8), (2, 5)]
    assert sum(b["loss_units"] for b in pieces) == whole[0]["loss_units"]
    # never more runs than items; a batch within the budget stays whole
    assert [b["n"] for b in micro_batches([batch], pad_collate, 1)] == [1] * 6
    assert [b["n"] for b in micro_batches([batch, batch[:2]], pad_collate, 40)] == [3, 3, 2]


def test_the_budget_may_change_when_a_run_resumes():
    stored = {"train": {"micro_batch_tokens": None, "lr": 1e-3}}
    new = {"train": {"micro_batch_tokens": 512, "lr": 1e-3}}
    assert config_changes(stored, new, SUPERVISED_MUTABLE) == (["train.micro_batch_tokens"], [])


def test_reward_model_cut_into_pieces_trains_to_the_same_weights(tmp_path, monkeypatch):
    model = build_tiny_model(tmp_path / "tiny", rd.texts(), vocab_size=300, hidden=32, layers=2, heads=4)
    rng = random.Random(3)
    data = rd.write_jsonl(tmp_path / "train.jsonl", [rd.pair(rng) for _ in range(48)])
    pieces_per_step: list[int] = []
    real = fit_module.micro_batches

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        pieces_per_step.append(len(out))
        return out

    monkeypatch.setattr(fit_module, "micro_batches", counting)

    def rm(out: Path, *extra: str) -> Path:
        assert main(["-q", "rm", "--model", str(model), "--data", str(data), "--output", str(out), "train.lr=3e-3",
                     "train.report_to=[]", "train.log_steps=1", "train.max_steps=5", "train.batch_size=8",
                     "train.max_grad_norm=1.0", *extra]) == 0
        return out

    whole = rm(tmp_path / "whole")
    assert set(pieces_per_step) == {1}
    pieces_per_step.clear()
    cut = rm(tmp_path / "cut", "train.micro_batch_tokens=64")
    assert min(pieces_per_step) >= 3  # 16 sequences a batch: really cut

    a, b = weights(whole), weights(cut)
    base = load_file(str(model / "model.safetensors"))
    moved = max((a[k] - base[k]).abs().max().item() for k in base)
    apart = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-3
    assert apart < 1e-4, (apart, moved)  # summation order only
    la = [m["loss"] for m in read_metrics(whole / "metrics.jsonl") if "loss" in m]
    lb = [m["loss"] for m in read_metrics(cut / "metrics.jsonl") if "loss" in m]
    assert len(la) == 5
    assert la == pytest.approx(lb, rel=1e-5)


@pytest.mark.slow(seconds=30)
def test_two_processes_cutting_batches_match_one_process(tiny_model, sft_data, tmp_path):
    # Both processes must forward as many pieces (DDP synchronises buffers in every forward), so they agree on
    # the count in one collective; a disagreement would hang here, a wrong split would move the weights.
    common = ("train.max_steps=4", "train.group_by_length=false")
    single = alignloop(*sft_args(tiny_model, sft_data, tmp_path / "one", *common, "train.grad_accum=2"))
    assert single.wait(timeout=300) == 0, single.stdout.read()
    ddp = alignloop(*sft_args(tiny_model, sft_data, tmp_path / "two", *common, "train.micro_batch_tokens=48"),
                    "--nproc", "2")
    assert ddp.wait(timeout=300) == 0, ddp.stdout.read()
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    apart = max((a[k] - b[k]).abs().max().item() for k in a)
    assert apart < 1e-4, apart
    la = [m["loss"] for m in read_metrics(tmp_path / "one" / "metrics.jsonl") if "loss" in m]
    lb = [m["loss"] for m in read_metrics(tmp_path / "two" / "metrics.jsonl") if "loss" in m]
    assert la == pytest.approx(lb, rel=1e-5)
