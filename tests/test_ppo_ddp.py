"""`alignloop ppo --nproc 2` (torchrun over gloo on loopback) gives what one process gives with the same
global batch, for PPO, GRPO and RLOO; and a SIGKILL + resume on two processes ends where an uninterrupted
two-process run does. The pieces the split relies on (row seeds, process shares, joined rollouts) are
tested as functions (the row seeds in test_collect_eval_ranks)."""

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
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from alignloop.config import ModelConfig, SamplingConfig
from alignloop.errors import UserError
from alignloop.generation.rollout import Rollout
from alignloop.generation.sampler import TransformersSampler
from alignloop.models.load import load_pretrained
from alignloop.models.tiny import build_tiny_model
from alignloop.runs import read_metrics
from alignloop.train.ppo import (
    TIMING_KEYS,
    check_process_split,
    concat_rollouts,
    response_logits_and_hidden,
)

TESTS = Path(__file__).resolve().parent
WORDS = "red blue green cat dog bird runs jumps sleeps big small happy sad tree river stone".split()
STEPS = 3
# Every statistic a step logs, compared between one and two processes. The samples are the same token
# for token (each generation call is seeded by its first row); what differs is the order of float sums
# (gloo's all-reduce of gradients and statistics vs one process's accumulation): measured 0 for every
# statistic below except the reward sources' means (the mean of two halves' means, 4e-8 relative).
COMPARED = ("score_mean", "score_std", "reward_total", "kl", "kl_coef", "response_length", "no_eos_frac",
            "policy_loss", "value_loss", "clip_frac", "approx_kl", "entropy", "ptx_loss", "vf_clip_frac",
            "explained_variance", "ppo_updates", "lr")
REL = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_ddp")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(200)]
    policy = build_tiny_model(root / "policy", texts, vocab_size=300, hidden=32, layers=2, heads=2)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(3))}) + "\n"
                               for _ in range(40)))
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": rng.choice(WORDS), "completion": " ".join(rng.sample(WORDS, 4))})
                           + "\n" for _ in range(20)))
    # a critic that starts from a reward model: its own transformer body, wrapped for DDP on its own
    rm = root / "rm"
    torch.manual_seed(3)
    AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1).save_pretrained(rm)
    AutoTokenizer.from_pretrained(policy).save_pretrained(rm)
    (rm / "alignloop.json").write_text(json.dumps({"stage": "rm", "normalization": {"mean": 0.5, "std": 2.0}}))
    return root, policy, prompts, sft


def write_config(setup, variant: str) -> Path:
    root, policy, prompts, sft = setup
    algorithm = variant.removesuffix("-rm-critic")
    # 8 rows a step, 4 per process; generation.batch_size 4 rows: the same generation calls in both runs.
    ppo = {"ppo": "critic: policy_head, ptx_coef: 0.1, ptx_batch_size: 2, ema_decay: 0.9, kl_target: 1.0",
           "ppo-rm-critic": f"critic: reward_model, critic_model: {root / 'rm'}, critic_lr: 0.001",
           "grpo": "samples_per_prompt: 2, kl_coef: 0.05", "rloo": "samples_per_prompt: 4"}[variant]
    config = root / f"{variant}.yaml"
    config.write_text(f"""\
model: {{name_or_path: {policy}}}
data: {{train: {prompts}, eval_fraction: 0.2, ptx: {sft}}}
reward: {{functions: ["test_ppo_loop:a_share"]}}
generation: {{max_new_tokens: 6, batch_size: 4}}
ppo: {{algorithm: {algorithm}, steps: {STEPS}, rollout_size: 8, mini_batch_size: 4, micro_batch_size: 2,
      ppo_epochs: 2, missing_eos_penalty: 0.5, {ppo}}}
train: {{lr: 0.003, save_steps: 1, report_to: [], sample_steps: 1}}
""")
    return config


def cli(config: Path, out: Path, *extra: str, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "alignloop", "-q", "ppo", "-c", str(config), "--output", str(out),
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc: the children's parent ids)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parent.items() if p in frontier]
        found += children
        frontier = children
    return found


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]


@pytest.mark.slow(seconds=45)
@pytest.mark.parametrize("variant", ["ppo", "ppo-rm-critic", "grpo", "rloo"])
def test_two_processes_match_one_process(setup, variant):
    root = setup[0]
    config = write_config(setup, variant)
    one, two = root / f"{variant}-one", root / f"{variant}-two"
    finish(cli(config, one))
    finish(cli(config, two, "--nproc", "2"))
    a, b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    keys = [k for k in COMPARED if k in a[0]]
    assert {"score_mean", "kl", "policy_loss", "entropy"} <= set(keys)
    if variant == "ppo":
        assert {"value_loss", "ptx_loss", "explained_variance"} <= set(keys)
    if variant == "ppo-rm-critic":
        assert {"value_loss", "explained_variance"} <= set(keys)
    for ra, rb in zip(a, b, strict=True):
        assert set(ra) == set(rb)
        for k in keys:
            assert rb[k] == pytest.approx(ra[k], rel=REL, abs=1e-6), (ra["step"], k)
    # The responses themselves: the same samples, logged by the main process from the gathered batch.
    assert (one / "samples.jsonl").read_text().count("response") == (two / "samples.jsonl").read_text().count(
        "response")
    responses = [[json.loads(line)["response"] for line in (run / "samples.jsonl").read_text().splitlines()]
                 for run in (one, two)]
    assert responses[0] == responses[1]
    ea, eb = (json.loads((run / "eval.json").read_text()) for run in (one, two))
    assert eb["reward_after"] == pytest.approx(ea["reward_after"], rel=REL)
    # DDP averaged the gradients (the value head's on the policy included): the same weights.
    base = load_file(str(setup[1] / "model.safetensors"))
    wa, wb = (load_file(str(run / "model" / "model.safetensors")) for run in (one, two))
    assert max((wa[k] - base[k]).abs().max().item() for k in base) > 1e-3
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


@pytest.mark.slow(seconds=55)
def test_sigkill_then_resume_on_two_processes_matches_uninterrupted_run(setup):
    root = setup[0]
    config = write_config(setup, "ppo")
    full = root / "kill-full"
    finish(cli(config, full, "--nproc", "2"))
    killed = root / "kill-killed"
    proc = cli(config, killed, "--nproc", "2")
    deadline = time.time() + 200
    while not (killed / "checkpoints" / "step-0000001").exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    # torchrun starts each rank in a session of its own: kill the launcher and every rank at once
    for pid in [proc.pid, *descendants(proc.pid)]:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed / "FINISHED").exists()
    assert len(read_metrics(killed / "metrics.jsonl")) < STEPS  # killed mid-run
    finish(cli(config, killed, "--nproc", "2"))
    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in a] == \
        [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in b]
    assert (full / "samples.jsonl").read_text() == (killed / "samples.jsonl").read_text()
    weights = [(run / "model" / "model.safetensors").read_bytes() for run in (full, killed)]
    assert weights[0] == weights[1]


def test_process_split_needs_whole_shares():
    assert check_process_split(8, 2, 1) == 8
    assert check_process_split(8, 2, 2) == 4
    with pytest.raises(UserError, match="multiples of 2"):
        check_process_split(7, 2, 2)
    with pytest.raises(UserError, match="multiples of 2"):
        check_process_split(8, 3, 2)


def test_concat_rollouts_pads_prompts_left_and_responses_right():
    a = Rollout(torch.tensor([[5, 6]]), torch.tensor([[1, 1]]), torch.tensor([[7, 2, 0]]),
                torch.tensor([[1, 1, 0]]), torch.tensor([True]), torch.tensor([[-1.0, -2.0, 0.0]]))
    b = Rollout(torch.tensor([[0, 8, 9]]), torch.tensor([[0, 1, 1]]), torch.tensor([[3]]),
                torch.tensor([[1]]), torch.tensor([False]), torch.tensor([[-0.5]]))
    r = concat_rollouts([a, b], pad_id=0)
    assert r.prompt_ids.tolist() == [[0, 5, 6], [0, 8, 9]]
    assert r.prompt_mask.tolist() == [[0, 1, 1], [0, 1, 1]]
    assert r.response_ids.tolist() == [[7, 2, 0], [3, 0, 0]]
    assert r.response_mask.tolist() == [[1, 1, 0], [1, 0, 0]]
    assert r.ended.tolist() == [True, False]
    assert r.logprobs.tolist() == [[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]]
    assert concat_rollouts([a], pad_id=0) is a


def test_ddp_wrapped_policy_gives_the_split_paths_logits_and_hidden_states(setup, tmp_path):
    """Under DDP the value head's hidden states come from the wrapped model's own forward (so its
    gradients are averaged); they are the ones the body-and-head split gives in one process."""
    model, tok = load_pretrained(ModelConfig(name_or_path=str(setup[1]), dropout=0.0), for_training=True)
    torch.manual_seed(0)
    r = TransformersSampler(model, [tok.eos_token_id], tok.pad_token_id).generate(
        [tok("red cat")["input_ids"], tok("big tree runs")["input_ids"]], SamplingConfig(max_new_tokens=5))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        logits, hidden = response_logits_and_hidden(wrapped, r, True)
        (logits.sum() + hidden.sum()).backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()
    split_logits, split_hidden = response_logits_and_hidden(model, r, True)
    assert logits.shape == split_logits.shape and hidden.shape == split_hidden.shape
    assert torch.allclose(logits, split_logits, atol=1e-5) and torch.allclose(hidden, split_hidden, atol=1e-5)
