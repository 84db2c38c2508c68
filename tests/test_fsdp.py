"""train.distributed=fsdp: FSDP2 over gloo on loopback (torchrun subprocesses). Two processes train SFT and
PPO as one process does with the same global batch; each process holds half the parameters; a SIGKILL +
resume from the sharded (DCP) checkpoint reproduces the uninterrupted run, and the checkpoint loads on one
process too; model/ is one plain transformers folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from alignloop.config import TrainConfig
from alignloop.errors import UserError
from alignloop.runs import read_metrics
from alignloop.train.ppo import TIMING_KEYS
from alignloop.training.checkpoint import Checkpointer
from alignloop.training.distributed import decoder_layer_classes, training_state_bytes, wrap_for_training
from alignloop.training.optim import build_optimizer, param_groups
from conftest import repeat_task, write_jsonl
from test_ppo_ddp import COMPARED, cli, descendants, write_config
from test_ppo_ddp import setup as ppo_world  # noqa: F401 (a fixture: the tiny PPO world)
from test_resume_and_ddp import alignloop, sft_args, weights

TESTS = Path(__file__).resolve().parent
# One process vs two: gloo's reduce-scatter sums gradients in another order than one process's
# accumulation, and the sharded runs take the plain forward (full logits, then the labelled positions)
# where one process projects only the labelled positions. Measured: SFT losses and gradient norms within
# 1e-7 relative, weights within 2e-7; PPO statistics within 2e-5 relative.
REL = 1e-4
SFT = ("train.max_steps=12", "train.save_steps=2", "train.log_steps=1", "train.group_by_length=false",
       "train.distributed=fsdp")
SFT_KEYS = ("loss", "grad_norm", "lr", "eval_loss")


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_training_state_bytes_per_process():
    # 16 bytes a parameter: float32 weight and gradient, AdamW's two float32 moments
    assert training_state_bytes(1000, 1, sharded=False) == {"device": 16_000, "cpu": 0}
    assert training_state_bytes(1000, 8, sharded=False) == {"device": 16_000, "cpu": 0}
    assert training_state_bytes(1000, 8, sharded=True) == {"device": 2_000, "cpu": 0}
    assert training_state_bytes(1001, 2, sharded=True) == {"device": 501 * 16, "cpu": 0}  # rounded up
    assert training_state_bytes(1000, 8, sharded=True, cpu_offload=True) == {"device": 0, "cpu": 2_000}
    assert training_state_bytes(1000, 1, sharded=False, cpu_offload=True) == {"device": 16_000, "cpu": 0}


def test_sharding_wraps_decoder_layers_and_refuses_adapters(tiny_model_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"))
    assert decoder_layer_classes(model) == {"LlamaDecoderLayer"}
    two_processes = SimpleNamespace(num_processes=2, mixed_precision="no")
    adapter = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(UserError, match="LoRA/QLoRA adapter with train.distributed=ddp"):
        wrap_for_training(two_processes, adapter, TrainConfig(distributed="fsdp"))


# Session scope: the slowest-first order (conftest) interleaves other modules' tests between this module's,
# which would end and rebuild module-scoped runs.
@pytest.fixture(scope="session")
def sft_world(tmp_path_factory, tiny_model_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fsdp-sft")
    return {"model": tiny_model_factory("llama"), "data": write_jsonl(d / "sft.jsonl", repeat_task(400)), "dir": d}


@pytest.fixture(scope="session")
def sft_runs(sft_world) -> dict[str, Path]:
    """One process accumulating two micro-batches, and two processes with one each: the same global batch."""
    m, data, d = sft_world["model"], sft_world["data"], sft_world["dir"]
    finish(alignloop(*sft_args(m, data, d / "one", *SFT, "train.grad_accum=2")))
    finish(alignloop(*sft_args(m, data, d / "two", *SFT), "--nproc", "2"))
    return {"one": d / "one", "two": d / "two"}


@pytest.mark.slow(seconds=25)
def test_worker_holds_half_the_parameters_and_generates_on_gathered_ones(tiny_model_factory, tmp_path):
    model = tiny_model_factory("llama")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(TESTS / "fsdp_worker.py"), str(model), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    total = ranks[0]["total"]
    # each process holds its half of every parameter (FSDP2 splits dim 0)
    assert sum(r["held"]["parameters"] for r in ranks) == total
    for r in ranks:
        assert 0.45 * total < r["held"]["parameters"] < 0.55 * total
        # weights, gradients and AdamW moments: what training_state_bytes says for a shard, measured
        assert r["held"]["state_bytes"] == training_state_bytes(total, 2, sharded=True)["device"]
        assert r["held_offloaded"] == r["held"]  # CPU offload: the same shards and the same loss
    # rank 0 generated 2 tokens, rank 1 seven: no hang, and the gathered model is the saved plain one
    plain = ranks[0]["plain_generated"][0]
    assert len(ranks[0]["generated"][0]) + 5 == len(ranks[1]["generated"][0]) == len(plain)
    assert ranks[1]["generated"][0] == plain and plain[: len(ranks[0]["generated"][0])] == ranks[0]["generated"][0]
    assert ranks[0]["weights_missing"] == []
    assert ranks[0]["offload_difference"] == 0.0


@pytest.mark.slow(seconds=50)
def test_sft_on_two_sharded_processes_matches_one_process(sft_world, sft_runs):
    a, b = read_metrics(sft_runs["one"] / "metrics.jsonl"), read_metrics(sft_runs["two"] / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 12
    for ra, rb in zip(a, b, strict=True):
        for k in SFT_KEYS:
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=REL), (ra["step"], k)
    base, wa, wb = load_file(str(sft_world["model"] / "model.safetensors")), weights(sft_runs["one"]), \
        weights(sft_runs["two"])
    assert wa.keys() == wb.keys()  # the same plain folder as one process writes (tied head saved once)
    assert max((wa[k] - base[k]).abs().max().item() for k in base) > 1e-3
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    # model/ is a plain transformers folder
    loaded = AutoModelForCausalLM.from_pretrained(sft_runs["two"] / "model")
    assert all(torch.equal(loaded.state_dict()[k], wb[k]) for k in wb)
    assert (sft_runs["two"] / "checkpoints" / "step-0000012" / "dcp" / ".metadata").is_file()


@pytest.mark.slow(seconds=60)
def test_sigkill_then_resume_from_the_sharded_checkpoint_matches_the_uninterrupted_run(sft_world, sft_runs):
    m, data, d = sft_world["model"], sft_world["data"], sft_world["dir"]
    killed = d / "killed"
    proc = alignloop(*sft_args(m, data, killed, *SFT), "--nproc", "2", start_new_session=True)
    deadline = time.time() + 200
    while not (killed / "checkpoints" / "step-0000002").exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    for pid in [proc.pid, *descendants(proc.pid)]:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed / "FINISHED").exists()
    assert len(read_metrics(killed / "metrics.jsonl")) < 12  # killed mid-run
    finish(alignloop(*sft_args(m, data, killed, *SFT), "--nproc", "2"))
    full = [{k: r[k] for k in ("step", *SFT_KEYS) if k in r} for r in read_metrics(sft_runs["two"] / "metrics.jsonl")]
    assert [{k: r[k] for k in ("step", *SFT_KEYS) if k in r} for r in read_metrics(killed / "metrics.jsonl")] == full
    wa, wb = weights(sft_runs["two"]), weights(killed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_two_process_sharded_checkpoint_loads_on_one_process(sft_world, sft_runs):
    """DCP reshards on load: the last checkpoint of the two-process run, loaded in this one process into a
    plain model and a fresh optimizer, holds the final weights whole and AdamW's full-size moments."""
    model = AutoModelForCausalLM.from_pretrained(sft_world["model"])
    optimizer = build_optimizer(param_groups(model.named_parameters(), 0.0), TrainConfig())
    ckpt = Checkpointer(sft_runs["two"] / "checkpoints", sharded=True)
    state = ckpt.load(ckpt.latest(), model, optimizer)
    assert state["train_state"]["step"] == 12
    final = weights(sft_runs["two"])
    assert all(torch.equal(model.state_dict()[k], final[k]) for k in final)
    states = [optimizer.state[p] for p in model.parameters()]
    assert all(s["exp_avg_sq"].shape == p.shape and float(s["step"]) == 12
               for p, s in zip(model.parameters(), states, strict=True))
    assert all(s["exp_avg_sq"].abs().sum() > 0 for s in states)


@pytest.fixture(scope="module")
def fsdp_ppo(request):
    """run(variant, nproc) -> the folder of a finished fsdp PPO run of test_ppo_ddp's tiny world (run once)."""
    world = request.getfixturevalue("ppo_world")
    done: dict[tuple[str, int], Path] = {}

    def run(variant: str, nproc: int) -> Path:
        if (variant, nproc) not in done:
            out = world[0] / f"fsdp-{variant}-{nproc}"
            finish(cli(write_config(world, variant), out, "train.distributed=fsdp", "--nproc", str(nproc)))
            done[variant, nproc] = out
        return done[variant, nproc]

    return run


@pytest.mark.slow(seconds=55)
@pytest.mark.parametrize("variant", ["ppo", "ppo-rm-critic"])
def test_ppo_on_two_sharded_processes_matches_one_process(fsdp_ppo, variant):
    """The policy (and its value head, or a critic with its own transformer body) sharded over two processes:
    the rollouts are generated on gathered parameters, the statistics equal one process's."""
    one, two = fsdp_ppo(variant, 1), fsdp_ppo(variant, 2)
    a, b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        assert set(ra) == set(rb)
        for k in COMPARED:
            if k in ra:
                # the clip fractions count values past a threshold: float noise moves one token of a minibatch
                tolerance = {"abs": 0.05} if k.endswith("clip_frac") else {"rel": REL, "abs": 1e-6}
                assert rb[k] == pytest.approx(ra[k], **tolerance), (ra["step"], k)
    assert {"value_loss", "explained_variance"} <= set(a[0])
    responses = [[json.loads(line)["response"] for line in (run / "samples.jsonl").read_text().splitlines()]
                 for run in (one, two)]
    assert responses[0] == responses[1]
    wa, wb = weights(one), weights(two)
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


@pytest.mark.slow(seconds=55)  # with the two-process run it shares, next to the tests that make it
def test_ppo_resumes_exactly_from_its_sharded_checkpoint(fsdp_ppo, request, tmp_path):
    """Policy, value head, optimizer, EMA and loop state from the DCP checkpoint of step 2 (the latest pointer
    moved back stands in for a kill after step 2; the SFT test above kills for real): step 3 and the final
    model are the uninterrupted run's, bit for bit."""
    full = fsdp_ppo("ppo", 2)
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for done in ("FINISHED", "eval.json"):
        (resumed / done).unlink()
    shutil.rmtree(resumed / "model")
    (resumed / "checkpoints" / "latest").write_text("step-0000002\n")
    config = write_config(request.getfixturevalue("ppo_world"), "ppo")
    finish(cli(config, resumed, "train.distributed=fsdp", "--nproc", "2"))
    strip = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(full / "metrics.jsonl")]
    assert [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(resumed / "metrics.jsonl")] \
        == strip
    assert (full / "samples.jsonl").read_text() == (resumed / "samples.jsonl").read_text()
    assert (full / "model" / "model.safetensors").read_bytes() == (resumed / "model" / "model.safetensors").read_bytes()
