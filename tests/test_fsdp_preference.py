"""The preference stages on several processes: KTO's reference point z0 is the mean over every process's
KL rows (all-reduced, as TRL does), so two processes train as one process with their two micro-batches
in one; and reward modelling and KTO with train.distributed=fsdp give what one process gives."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import reward_data as rd
from alignloop.models.tiny import build_tiny_model
from alignloop.runs import read_metrics
from alignloop.train import dpo_losses as dl
from conftest import write_jsonl
from test_dpo import preference_pairs, unpaired
from test_resume_and_ddp import alignloop

# Float tolerance between one process and two: gloo's all-reduce of gradients sums in another order than
# one process's accumulation (measured below 1e-6 relative on these runs).
REL = 1e-4
# Weights after 4 AdamW steps at lr 3e-3 (each moves a weight by up to ~lr): where a gradient is near zero,
# Adam's m / sqrt(v) turns a rounding-size difference in it into a visible one in the step. The largest
# difference measured: below 1e-5 on AVX-512 CPUs, 1.13e-5 on an AVX2 one (AMD EPYC); 0.1 % of the 1.2e-2
# that training can move a weight.
WEIGHT_ATOL = 3e-5


def finish(proc) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def assert_same_training(one: Path, two: Path, keys: tuple[str, ...]) -> None:
    a, b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    compared = 0
    for ra, rb in zip(a, b, strict=True):
        for k in keys:
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=REL, abs=1e-6), (ra["step"], k)
                compared += 1
    assert compared >= 4
    wa, wb = weights(one), weights(two)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < WEIGHT_ATOL


def test_kto_reference_point_is_the_clamped_mean_that_the_given_mean_computes():
    policy, reference = torch.tensor([-1.0, -2.0, -4.0]), torch.tensor([-2.0, -2.0, -2.0])
    assert dl.kto_reference_point(policy, reference).item() == 0.0  # mean(1, 0, -2) < 0: clamped
    assert dl.kto_reference_point(policy[:2], reference[:2]).item() == 0.5
    # another process's rows shift the mean: (1 + 0 + 5 + 6) / 4 = 3, as an all-reduce of sum and count gives
    other = torch.tensor([5.0, 6.0])
    assert dl.kto_reference_point(policy[:2], reference[:2],
                                  mean=lambda d: (d.sum() + other.sum()) / (d.numel() + other.numel())).item() == 3.0


@pytest.fixture(scope="module")
def kto_world(tmp_path_factory, tiny_model_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("kto")
    return {"model": tiny_model_factory("llama"), "dir": d,
            "train": write_jsonl(d / "train.jsonl", unpaired(preference_pairs(64, 1))),
            "val": write_jsonl(d / "val.jsonl", unpaired(preference_pairs(8, 2)))}


def kto(world: dict[str, Path], out: Path, *extra: str):
    # group_by_length off: a 16-row batch is then exactly the two 8-row batches the two processes take
    return alignloop("dpo", "--policy", str(world["model"]), "--data", str(world["train"]), "--eval-data",
                     str(world["val"]), "--output", str(out), "dpo.loss=kto", "train.lr=3e-3",
                     "train.report_to=[]", "train.log_steps=1", "train.max_steps=4", "train.group_by_length=false",
                     "train.eval_batch_size=8",
                     *extra)


@pytest.fixture(scope="module")
def kto_one_process(kto_world) -> Path:
    out = kto_world["dir"] / "one"
    finish(kto(kto_world, out, "train.batch_size=16"))
    return out


@pytest.mark.slow(seconds=40)
@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_kto_on_two_processes_matches_one_process(kto_world, kto_one_process, distributed):
    two = kto_world["dir"] / f"two-{distributed}"
    finish(kto(kto_world, two, "train.batch_size=8", f"train.distributed={distributed}", "--nproc", "2"))
    # (reward_desirable / reward_undesirable are class means per micro-batch, weighted: they depend on the
    # split into micro-batches, which differs here by design, so they are not compared)
    assert_same_training(kto_one_process, two, ("loss", "kl", "grad_norm", "eval_loss"))


@pytest.mark.slow(seconds=45)
def test_reward_model_with_fsdp_on_two_processes_matches_one_process(tmp_path):
    model = build_tiny_model(tmp_path / "tiny", rd.texts(), vocab_size=300, hidden=32, layers=2, heads=4)
    rng = random.Random(5)
    train = rd.write_jsonl(tmp_path / "train.jsonl", [rd.pair(rng) for _ in range(64)])
    val = rd.write_jsonl(tmp_path / "val.jsonl", [rd.pair(rng) for _ in range(16)])

    def rm(out: Path, *extra: str):
        return alignloop("rm", "--model", str(model), "--data", str(train), "--eval-data", str(val), "--output",
                         str(out), "train.lr=3e-3", "train.report_to=[]", "train.log_steps=1", "train.max_steps=4",
                         "train.batch_size=8", "train.group_by_length=false", "train.distributed=fsdp", *extra)

    finish(rm(tmp_path / "one", "train.grad_accum=2"))
    finish(rm(tmp_path / "two", "--nproc", "2"))
    assert_same_training(tmp_path / "one", tmp_path / "two", ("loss", "grad_norm", "eval_loss", "eval_accuracy"))
