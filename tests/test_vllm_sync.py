"""The parts of the vLLM backend that need no vLLM: the weights a push sends (LoRA merged, checkpoint
names), its buckets, the version pin, and the truncated importance-sampling correction of the rollout
engine's log-probs (hand-computed values)."""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from alignloop.config import PPOConfig, build_config
from alignloop.errors import UserError
from alignloop.generation.vllm import (
    TESTED_VLLM_VERSIONS,
    WeightSync,
    check_vllm_version,
    import_vllm,
    layer_group,
    merged_weights,
)
from alignloop.rl import ppo_math as pm

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture
def llama(tiny_model_factory):
    return AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama", hidden=32, heads=2), dtype=torch.float32)


def test_merged_weights_of_a_full_model_are_its_checkpoint(llama):
    sent = dict(merged_weights(llama))
    saved = llama.state_dict()
    # tied: the LM head is the embedding, sent once (vLLM ties them again)
    assert set(sent) == set(saved) - {"lm_head.weight"}
    assert all(torch.equal(sent[name], saved[name]) for name in sent)


def test_merged_weights_of_a_lora_model_equal_the_merged_checkpoint_and_leave_the_model_alone(llama):
    model = get_peft_model(llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # as if training had moved the adapter (a fresh B is 0: no delta)
    before = {n: p.clone() for n, p in model.named_parameters()}
    sent = dict(merged_weights(model))
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(sent) == set(merged) - {"lm_head.weight"}
    assert not any("lora_" in n or "base_layer" in n for n in sent)
    for name in sent:
        torch.testing.assert_close(sent[name], merged[name], rtol=0, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(sent[q], llama.state_dict()["model.layers.0.self_attn.q_proj.base_layer.weight"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_merged_weights_gather_fsdp2_shards_into_plain_tensors(llama):
    """FSDP2 parameters are DTensors (each process holds a shard): the push sends whole plain tensors.
    One process over gloo here; with several, every process iterates in the same order (a collective)."""
    expected = {n: t.clone() for n, t in merged_weights(llama)}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        fully_shard(llama, mesh=init_device_mesh("cpu", (1,)))
        assert all(isinstance(p, DTensor) for p in llama.parameters())
        sent = dict(merged_weights(llama))
    finally:
        dist.destroy_process_group()
    assert set(sent) == set(expected)
    assert all(type(t) is torch.Tensor and torch.equal(t, expected[n]) for n, t in sent.items())


class RecordingLLM:
    def __init__(self):
        self.calls: list[tuple[str, list[str]]] = []

    def collective_rpc(self, method, kwargs):
        self.calls.append((method, [name for name, _ in kwargs["weights_iterator"]]))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache", []))


def test_weight_sync_sends_buckets_of_whole_blocks_then_drops_the_prefix_cache():
    mib = torch.zeros(1 << 18)  # 1 MiB of float32
    items = [("model.embed_tokens.weight", mib)]
    for layer in range(3):
        items += [(f"model.layers.{layer}.self_attn.{p}_proj.weight", mib) for p in "qkv"]
    items += [("model.norm.weight", mib), ("lm_head.weight", mib)]
    llm = RecordingLLM()
    calls = WeightSync(llm, bucket_bytes=2 << 20, tied_embeddings=False).push(iter(items))
    sent = [names for method, names in llm.calls if method == "reload_weights"]
    assert calls == len(sent) == 4
    # a bucket closes once it holds 2 MiB, but never inside a block (vLLM fuses q/k/v into one layer)
    assert sent == [["model.embed_tokens.weight"] + [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"],
                    [f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv"],
                    [f"model.layers.2.self_attn.{p}_proj.weight" for p in "qkv"],
                    ["model.norm.weight", "lm_head.weight"]]
    assert llm.calls[-1] == ("reset_prefix_cache", [])


def test_layer_group_is_the_block_else_the_module():
    assert layer_group("model.layers.12.mlp.gate_proj.weight") == "model.layers.12"
    assert layer_group("transformer.h.3.attn.c_attn.bias") == "transformer.h.3"
    assert layer_group("model.norm.weight") == "model.norm"
    assert layer_group("lm_head.weight") == "lm_head"


@pytest.mark.parametrize("version", ["0.31.1", "0.33.0", "0.32.1+cpu"])
def test_an_untested_vllm_release_is_one_clear_line(version):
    with pytest.raises(UserError) as info:
        check_vllm_version(version)
    message = str(info.value)
    assert "\n" not in message and version in message and TESTED_VLLM_VERSIONS[-1] in message


def test_the_tested_release_passes_with_or_without_a_local_build_tag():
    for version in TESTED_VLLM_VERSIONS:
        check_vllm_version(version)
        check_vllm_version(version + "+cpu")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_the_vllm_backend_without_vllm_is_one_clear_line():
    with pytest.raises(UserError, match="generation.backend=vllm needs the vllm package") as info:
        import_vllm()
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- truncated importance sampling


def test_truncated_is_weights_against_hand_values():
    trainer = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.0, 0.0]])
    # ratios p_trainer / p_rollout: 1, 1.5, 3 | 0.5, 1, (padding: a huge one that must count nowhere)
    rollout = trainer - torch.log(torch.tensor([[1.0, 1.5, 3.0], [0.5, 1.0, 1e-6]]))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    weights, stats = pm.truncated_is_weights(trainer, rollout, mask, cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 1.5, 2.0], [0.5, 1.0, 0.0]]))
    assert stats["rollout_logp_abs_diff"] == pytest.approx((math.log(1.5) + math.log(3) + math.log(2)) / 5)
    assert stats["rollout_is_ratio_max"] == pytest.approx(3.0)
    assert stats["rollout_is_clip_frac"] == pytest.approx(1 / 5)
    off, off_stats = pm.truncated_is_weights(trainer, rollout, mask, cap=None)
    assert off is None and off_stats["rollout_is_clip_frac"] == 0.0
    assert off_stats["rollout_is_ratio_max"] == pytest.approx(3.0)


def test_policy_loss_weights_each_token_by_its_correction():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.0, 0.0]])
    advantages = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    weights = torch.tensor([[1.0, 1.5, 2.0], [0.5, 1.0, 0.0]])
    # ratio 1 everywhere (logp == old_logp): each term is -A, times its weight, over 5 tokens
    loss, _ = pm.policy_loss(logp, logp, advantages, mask, 0.2, weights)
    assert loss.item() == pytest.approx(-(1 * 1 + 2 * 1.5 + 3 * 2 + 4 * 0.5 + 5 * 1) / 5)
    plain, _ = pm.policy_loss(logp, logp + 0.1, advantages, mask, 0.2)
    ones, _ = pm.policy_loss(logp, logp + 0.1, advantages, mask, 0.2, torch.ones_like(mask))
    assert torch.equal(plain, ones)  # weights of 1 change nothing, bit for bit


def test_rollout_is_cap_defaults_to_2_and_can_be_switched_off(tmp_path):
    flags = {"model.name_or_path": "m", "data.train": "p.jsonl", "ppo.critic": "policy_head"}
    assert build_config(PPOConfig, None, flags, []).ppo.rollout_is_cap == 2.0
    assert build_config(PPOConfig, None, flags, ["ppo.rollout_is_cap=null"]).ppo.rollout_is_cap is None
    with pytest.raises(UserError, match="rollout_is_cap"):
        build_config(PPOConfig, None, flags, ["ppo.rollout_is_cap=0.5"])
