"""Causal-LM SFT end to end on tiny models: learning, masking, packing, architectures, freezing, LoRA."""

from __future__ import annotations

import json

import pytest
import torch

from alignloop.config import SFTConfig, build_config
from alignloop.runs import read_metrics
from alignloop.train.sft import run_sft
from conftest import repeat_task, write_jsonl


def sft_config(model, data, out, **overrides) -> SFTConfig:
    base = {"train.lr": 3e-3, "train.epochs": 3, "train.batch_size": 16, "train.log_steps": 5,
            "train.report_to": [], "data.max_seq_len": 64}
    base.update(overrides)
    items = [f"{k}={json.dumps(v)}" for k, v in base.items()]
    return build_config(SFTConfig, None, {"model.name_or_path": str(model), "data.train": str(data),
                                          "output_dir": str(out)}, items)


def eval_curve(run_dir) -> list[float]:
    return [m["eval_loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in m]


@pytest.mark.parametrize("packing", [False, True])
def test_sft_lowers_validation_loss_by_30_percent(tiny_model, sft_data, tmp_path, packing):
    run = run_sft(sft_config(tiny_model, sft_data, tmp_path / "run", **{"data.packing": packing}))
    curve = eval_curve(run)
    assert curve[-1] <= 0.7 * curve[0], curve
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "FINISHED", "data_report.json"):
        assert (run / name).is_file(), name
    assert (run / "model" / "model.safetensors").is_file()
    assert any((run / "checkpoints").glob("step-*"))
    evaluation = json.loads((run / "eval.json").read_text())
    assert evaluation["validation"]["eval_loss"] == pytest.approx(min(curve), rel=1e-5)
    report = json.loads((run / "data_report.json").read_text())
    if packing:
        assert report["packing"]["rows"] < report["packing"]["examples"]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_architectures_train_save_and_reload(tiny_model_factory, sft_data, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_factory(arch)
    run = run_sft(sft_config(model_dir, sft_data, tmp_path / "run", **{"train.epochs": 1}))
    curve = eval_curve(run)
    assert curve[-1] < curve[0]
    reloaded = AutoModelForCausalLM.from_pretrained(run / "model")
    assert reloaded.config.model_type == arch


def test_frozen_layers_and_embeddings_stay_unchanged(tiny_model, sft_data, tmp_path):
    from safetensors.torch import load_file

    run = run_sft(sft_config(tiny_model, sft_data, tmp_path / "run", **{
        "train.epochs": 1, "model.freeze_layers": 1, "model.freeze_embeddings": True}))
    before = load_file(str(tiny_model / "model.safetensors"))
    after = load_file(str(run / "model" / "model.safetensors"))
    frozen = [k for k in before if "layers.0." in k or "embed_tokens" in k]
    trained = [k for k in before if "layers.1." in k and k.endswith("proj.weight")]
    assert frozen and trained
    for k in frozen:
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in trained)


def test_lora_saves_only_the_adapter_and_merge_reproduces_logits(tiny_model, sft_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from alignloop.config import ModelConfig
    from alignloop.models.export import export_model
    from alignloop.models.load import load_pretrained

    run = run_sft(sft_config(tiny_model, sft_data, tmp_path / "run", **{
        "train.epochs": 1, "model.adapter": "lora", "model.lora.r": 4}))
    files = {p.name for p in (run / "model").iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    adapter_model, tok = load_pretrained(ModelConfig(name_or_path=str(run / "model")), for_training=False)
    merged_dir = export_model(run / "model", tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    ids = tok("Repeat twice: red cat dog\n", return_tensors="pt")["input_ids"]
    adapter_model.eval()
    merged.eval()
    with torch.no_grad():
        a = adapter_model(input_ids=ids).logits
        b = merged(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    # The adapter actually changed the model: merged logits differ from the base model's.
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, b, atol=1e-4)


def test_lora_runs_with_one_seed_give_identical_adapters(tiny_model, sft_data, tmp_path):
    from safetensors.torch import load_file

    def adapter(out, seed: int) -> dict[str, torch.Tensor]:
        # Scrambling the global RNG first: the run must not depend on what ran before it.
        torch.manual_seed(len(str(out)) * 7919)
        run = run_sft(sft_config(tiny_model, sft_data, out, **{
            "train.max_steps": 2, "train.seed": seed, "model.adapter": "lora", "model.lora.r": 4}))
        return load_file(str(run / "model" / "adapter_model.safetensors"))

    first, second = adapter(tmp_path / "a", 3), adapter(tmp_path / "bb", 3)
    assert first.keys() == second.keys() and first
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = adapter(tmp_path / "ccc", 4)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_chat_messages_train(tiny_model, tmp_path):
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in repeat_task(300)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    run = run_sft(sft_config(tiny_model, data, tmp_path / "run", **{"train.epochs": 2}))
    curve = eval_curve(run)
    assert curve[-1] <= 0.8 * curve[0]
