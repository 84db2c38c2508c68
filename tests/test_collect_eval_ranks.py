"""`alignloop collect --nproc 2` and `alignloop eval --nproc 2` (torchrun over gloo on loopback) write what
one process writes: the same candidate rows in the same order, the same eval.json and samples.jsonl, with
an odd number of generation calls so the two processes get unequal shares. The pieces the split relies on
(call ranges, process shares, call seeds, the forked RNG) are tested as functions against hand-computed
values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from alignloop.data import synthetic as S
from alignloop.feedback.db import Candidate, open_db
from alignloop.feedback.db import Prompt as PromptRow
from alignloop.generation.calls import call_ranges, process_share, rollout_seed, seeded
from alignloop.models.load import load_tokenizer, save_model
from alignloop.models.tiny import build_tiny_model

# 9 prompts, 2 per generation call: 5 calls, 3 (6 prompts) for the first process, 2 (3 prompts) for the second
N_PROMPTS, PER_CALL = 9, 2


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ranks")
    texts = [r["text"] for r in S.pretraining_corpus(300, seed=0)]
    policy = build_tiny_model(root / "policy", texts, vocab_size=400, hidden=32, layers=2, heads=2, seed=1)
    baseline = root / "baseline"  # the same tokenizer, other random weights
    torch.manual_seed(2)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(policy)).save_pretrained(baseline)
    load_tokenizer(str(policy)).save_pretrained(baseline)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(baseline, num_labels=1)
    save_model(rm, load_tokenizer(str(baseline)), root / "rm",
               meta={"stage": "rm", "normalization": {"mean": 0.5, "std": 2.0}})
    prompts = S.write_jsonl(root / "prompts.jsonl", S.eval_prompts(N_PROMPTS, seed=0))
    test = S.write_jsonl(root / "test.jsonl", S.sft_records(4, seed=1))
    return {"root": root, "policy": policy, "baseline": baseline, "rm": root / "rm", "prompts": prompts,
            "test": test}


def cli(*args: str | Path) -> str:
    """The command's standard output (torchrun passes its processes' through)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "alignloop", "-q", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout


def candidate_rows(db: str) -> list[tuple]:
    with open_db(db)() as s:
        rows = s.query(PromptRow.text, Candidate.text, Candidate.model, Candidate.generation).join(
            Candidate, Candidate.prompt_id == PromptRow.id).order_by(PromptRow.id, Candidate.id).all()
        return [tuple(r) for r in rows]


@pytest.mark.slow(seconds=35)
def test_collect_on_two_processes_writes_what_one_process_writes(world, tmp_path):
    rows = {}
    for nproc in (1, 2):
        db = f"sqlite:///{tmp_path / f'fb-{nproc}.db'}"
        printed = cli(
            "collect", "--model", world["policy"], "--prompts", world["prompts"], "--round", "r1", "--k", 2,
            "--batch-size", PER_CALL, "--max-new-tokens", 8, "--seed", 5, "--db", db, "--model-label", "tiny",
            "--nproc", nproc)
        rows[nproc] = candidate_rows(db)
        assert printed.count(f"for each of {N_PROMPTS} prompts") == 1  # the main process's line only
    assert len(rows[1]) == 2 * N_PROMPTS
    assert [r[0] for r in rows[1][::2]] == [json.loads(line)["prompt"]
                                            for line in world["prompts"].read_text().splitlines()]
    assert len({r[1] for r in rows[1]}) > N_PROMPTS  # really sampled: the candidates differ
    assert {k: rows[1][1][3][k] for k in ("batch_size", "seed", "max_new_tokens", "k", "sample")} == \
        {"batch_size": PER_CALL, "seed": 5, "max_new_tokens": 8, "k": 2, "sample": 1}
    assert rows[2] == rows[1]


@pytest.mark.slow(seconds=45)
def test_eval_on_two_processes_writes_what_one_process_writes(world, tmp_path):
    outs, printed = {}, {}
    for nproc in (1, 2):
        outs[nproc] = tmp_path / f"eval-{nproc}"
        printed[nproc] = cli(
            "eval", "--policy", world["policy"], "--baseline", world["baseline"], "--reward-model",
            world["rm"], "--prompts", world["prompts"], "--gold", "alignloop.data.synthetic:gold_breakdown",
            "--test-data", world["test"], "--blocklist", "cat,before,about,kind,away",
            "--output", outs[nproc], "--nproc", nproc, "generation.max_new_tokens=10",
            f"generation.batch_size={PER_CALL}", "batch_size=4")
    one, two = ({"eval": json.loads((out / "eval.json").read_text()),
                 "samples": [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]}
                for out in (outs[1], outs[2]))
    samples = one["samples"]
    assert [s["index"] for s in samples] == list(range(N_PROMPTS))
    policy = [s["responses"]["policy"] for s in samples]
    assert {"text", "tokens", "reward_model", "gold", "flagged", "kl"} <= set(policy[0])
    assert len({p["text"] for p in policy}) > 1 and any(p["flagged"] for p in policy)
    assert one["eval"]["models"]["policy"]["test"]["tokens"] > 0
    reward_wr = one["eval"]["win_rate"]["reward_model"]
    assert reward_wr["wins"] + reward_wr["losses"] > 0
    assert two["samples"] == samples
    assert two["eval"] == one["eval"]
    assert (outs[2] / "FINISHED").is_file()
    # one headline and one "finished", from the main process (two would mean two one-process runs)
    assert printed[2].count("win rate (gold)") == printed[2].count("finished: ") == 1
    assert printed[2].replace(str(outs[2]), "OUT") == printed[1].replace(str(outs[1]), "OUT")


def test_call_ranges_cut_prompts_into_calls():
    assert call_ranges(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert call_ranges(4, 2) == [range(0, 2), range(2, 4)]
    assert call_ranges(3, None) == [range(0, 3)]  # generation.batch_size null: one call
    assert call_ranges(2, 8) == [range(0, 2)]
    assert call_ranges(0, 2) == []


def test_process_share_is_a_contiguous_run_of_whole_calls():
    calls = call_ranges(9, 2)  # 5 calls
    assert process_share(calls, 0, 1) == calls
    assert process_share(calls, 0, 2) == [range(0, 2), range(2, 4), range(4, 6)]
    assert process_share(calls, 1, 2) == [range(6, 8), range(8, 9)]
    assert [len(process_share(calls, r, 3)) for r in range(3)] == [2, 2, 1]
    assert [len(process_share(calls[:1], r, 2)) for r in range(2)] == [1, 0]  # more processes than calls
    for world in (1, 2, 3, 4, 7):
        assert [c for r in range(world) for c in process_share(calls, r, world)] == calls


def test_rollout_seed_is_a_function_of_the_row():
    assert rollout_seed(0, 0, 0) == 0
    assert rollout_seed(0, 0, 4) == 4
    assert rollout_seed(0, 2, 4) == 2 * 1_000_003 + 4
    assert rollout_seed(1, 0, 0) == 1_000_003 ** 2
    seeds = {rollout_seed(s, t, r) for s in range(3) for t in range(3) for r in range(0, 64, 4)}
    assert len(seeds) == 3 * 3 * 16


def test_seeded_draws_from_its_seed_and_leaves_the_outer_stream_alone():
    torch.manual_seed(0)
    expected_outer = torch.rand(3)
    torch.manual_seed(7)
    expected_inner = torch.rand(2)
    torch.manual_seed(0)
    first = torch.rand(1)
    with seeded(7):
        inner = torch.rand(2)
    rest = torch.rand(2)
    assert torch.equal(inner, expected_inner)
    assert torch.equal(torch.cat([first, rest]), expected_outer)
