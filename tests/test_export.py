"""`alignloop export`: a LoRA run's model merges into a standalone folder that plain transformers loads."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from alignloop.cli import main
from alignloop.config import DataConfig, LoraSettings, ModelConfig, SFTConfig, dump_config
from alignloop.errors import UserError
from alignloop.models.export import export_model
from alignloop.models.load import load_pretrained, prepare_for_training, save_model
from alignloop.runs import atomic_write_json

EVAL = {"steps": 12, "validation": {"eval_loss": 1.234567, "eval_perplexity": 3.43689}, "test": {"eval_loss": 1.5}}


@pytest.fixture
def lora_run(tmp_path, tiny_model_factory):
    """A finished-looking SFT run folder whose model/ is a LoRA adapter with non-zero weights."""
    base = tiny_model_factory("llama")
    cfg = SFTConfig(output_dir=str(tmp_path / "run"), model=ModelConfig(name_or_path=str(base), adapter="lora",
                                                                        lora=LoraSettings(r=4)),
                    data=DataConfig(train="data/train.jsonl", eval="data/val.jsonl"))
    model, tok = load_pretrained(cfg.model, for_training=True)
    model = prepare_for_training(model, cfg.model)
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    run = tmp_path / "run"
    save_model(model, tok, run / "model", meta={"stage": "sft", "base_model": "org/tiny-base", "adapter": "lora"})
    dump_config(cfg, run / "config.yaml")
    atomic_write_json(run / "eval.json", EVAL)
    atomic_write_json(run / "data_report.json", {"train": {"file": "data/train.jsonl", "kept": 380, "dropped": 20}})
    return run


def test_merged_export_reloads_with_plain_transformers_and_same_logits(lora_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = export_model(lora_run / "model", tmp_path / "exported", merge=True)
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").exists()
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    adapter, tok = load_pretrained(ModelConfig(name_or_path=str(lora_run / "model")), for_training=True)
    base, _ = load_pretrained(ModelConfig(name_or_path=adapter.peft_config["default"].base_model_name_or_path),
                              for_training=False)
    # what eval, collect, predict and serve load: the adapter already merged, no PEFT wrapper left
    inference, _ = load_pretrained(ModelConfig(name_or_path=str(lora_run / "model")), for_training=False)
    assert not isinstance(inference, PeftModel)
    ids = tok(["Repeat twice: red cat dog\nred cat", "big"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = adapter.eval()(**ids).logits
        got = plain(**ids).logits
        merged_on_load = inference(**ids).logits
        untouched = base.eval()(**ids).logits
    assert (want - untouched).abs().max() > 1e-2  # the adapter matters, so equal logits mean it was merged
    # Merging rounds W + BA once; the adapter path adds BA x on the fly (seen: 1.8e-5 apart with one thread).
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged_on_load, want, atol=1e-4, rtol=1e-4)

    exported_tok = AutoTokenizer.from_pretrained(out)
    assert exported_tok.chat_template and exported_tok.pad_token_id != exported_tok.eos_token_id
    gen = GenerationConfig.from_pretrained(out)
    assert gen.pad_token_id == exported_tok.pad_token_id
    assert exported_tok.eos_token_id in (gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id])

    card = (out / "README.md").read_text()
    assert "| validation.eval_loss | 1.23457 |" in card and "| validation.eval_perplexity | 3.43689 |" in card
    assert "| test.eval_loss | 1.5 |" in card and "| steps | 12 |" in card
    assert "`data.train`: `data/train.jsonl`" in card and '"kept": 380' in card
    assert "adapter: lora" in card and "base_model: org/tiny-base" in card  # config.yaml and front matter
    assert json.loads((out / "eval.json").read_text()) == EVAL
    assert (out / "training_config.yaml").read_text() == (lora_run / "config.yaml").read_text()
    assert json.loads((out / "alignloop.json").read_text())["merged"] is True


def test_export_refuses_unmerged_adapter_and_missing_folder(lora_run, tmp_path, capsys):
    with pytest.raises(UserError, match="--merge"):
        export_model(lora_run / "model", tmp_path / "out")
    assert main(["export", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model folder not found" in err and "Traceback" not in err
    assert main(["export", "--model", str(lora_run / "model"), "--output", str(tmp_path / "cli-out"), "--merge"]) == 0
    assert (tmp_path / "cli-out" / "README.md").is_file()
