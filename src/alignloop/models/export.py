"""Standalone model folders from a run's model/: full weights, or a LoRA adapter merged into its base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from alignloop.config import ModelConfig
from alignloop.errors import UserError
from alignloop.models.load import META_FILE, load_pretrained, read_meta, save_model


def export_model(model_dir: str | Path, output: str | Path, merge: bool = False) -> Path:
    src = Path(model_dir)
    if not src.is_dir():
        raise UserError(f"model folder not found: {src}")
    is_adapter = (src / "adapter_config.json").exists()
    if is_adapter and not merge:
        raise UserError(f"{src} holds a LoRA adapter; pass --merge to write a standalone model")
    model, tok = load_pretrained(ModelConfig(name_or_path=str(src)), for_training=False)
    if is_adapter:
        model = model.merge_and_unload()
    meta = read_meta(src)
    meta.update({"exported_from": str(src.resolve()), "merged": bool(is_adapter)})
    out = save_model(model, tok, output, meta=meta)
    # The run's evaluation travels with the model (issue: model card); keep the raw file too.
    run_eval = src.parent / "eval.json"
    if run_eval.is_file():
        shutil.copyfile(run_eval, out / "eval.json")
    json.loads((out / META_FILE).read_text())
    return out
