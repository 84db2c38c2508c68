"""Standalone model folders from a run's model/: full weights, or a LoRA adapter merged into its base.

The exported folder loads with plain transformers (no peft, no alignloop) and carries what a user
needs to serve and judge it: safetensors weights, the tokenizer with its chat template, a
generation config whose stop tokens match the template, and a model card (README.md) with the
evaluation figures, the data it was trained on and the full training config of the run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from transformers import AutoModelForSequenceClassification

from alignloop.config import ModelConfig
from alignloop.data.tokenize import ensure_chat_template, stop_token_ids
from alignloop.errors import UserError
from alignloop.models.load import load_pretrained, read_meta, save_model
from alignloop.runs import atomic_write_text

# Run-folder files that travel with the model (the card summarises them; the raw files stay exact).
RUN_FILES = {"eval.json": "eval.json", "data_report.json": "data_report.json", "config.yaml": "training_config.yaml"}


def export_model(model_dir: str | Path, output: str | Path, merge: bool = False) -> Path:
    src = Path(model_dir)
    if not src.is_dir():
        raise UserError(f"model folder not found: {src}")
    out = Path(output)
    if out.resolve() == src.resolve():
        raise UserError(f"--output {out} is the model folder itself; choose another folder")
    is_adapter = (src / "adapter_config.json").exists()
    if is_adapter and not merge:
        raise UserError(f"{src} holds a LoRA adapter; pass --merge to write a standalone model")
    meta = read_meta(src)
    reward = meta.get("stage") == "rm"
    auto_cls = AutoModelForSequenceClassification if reward else None
    # loaded for inference, a LoRA folder comes back with its adapter merged into the base weights
    model, tok = load_pretrained(ModelConfig(name_or_path=str(src)), auto_cls=auto_cls, for_training=False)
    if not reward:
        ensure_chat_template(tok)
        complete_generation_config(model, tok)
    run = read_run(src.parent)
    meta.update({"exported_from": str(src.resolve()), "merged": bool(is_adapter)})
    save_model(model, tok, out, meta=meta)
    for name, target in RUN_FILES.items():
        if (src.parent / name).is_file():
            shutil.copyfile(src.parent / name, out / target)
    atomic_write_text(out / "README.md", model_card(out.name, src, meta, run, reward))
    return out


def complete_generation_config(model, tok) -> None:
    """Stop at EOS and at the chat template's end-of-turn token; pad with the (distinct) pad token."""
    gc = model.generation_config
    stop = stop_token_ids(tok, model.config, gc)
    gc.eos_token_id = stop[0] if len(stop) == 1 else stop
    gc.pad_token_id = tok.pad_token_id
    if tok.bos_token_id is not None:
        gc.bos_token_id = tok.bos_token_id


def read_run(folder: Path) -> dict[str, Any]:
    """What the run folder around model/ says about the model: config, data report, evaluation."""
    run: dict[str, Any] = {}
    if (folder / "config.yaml").is_file():
        run["config_text"] = (folder / "config.yaml").read_text(encoding="utf-8")
        run["config"] = yaml.safe_load(run["config_text"]) or {}
    for key in ("eval", "data_report"):
        path = folder / f"{key}.json"
        if path.is_file():
            try:
                run[key] = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return run


def flatten(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested evaluation dicts as ("validation.eval_loss", 1.23) rows; lists are left out."""
    rows = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += flatten(value, name + ".")
        elif isinstance(value, bool | int | float | str) or value is None:
            rows.append((name, value))
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value).replace("|", "\\|")


def _data_files(config: dict) -> list[tuple[str, str]]:
    files = []
    for section in ("data", "prompts", "feedback"):
        block = config.get(section)
        if isinstance(block, dict):
            files += [(f"{section}.{k}", str(v)) for k, v in block.items()
                      if isinstance(v, str) and k in ("train", "eval", "test", "path", "url", "database")]
    return files


def benchmark_lines(evaluation: dict) -> list[str]:
    """A markdown table of ``alignloop eval --benchmarks`` scores (task, metric, one column per evaluated
    model: value ± stderr); no lines when the evaluation ran no benchmarks."""
    models = {name: m["benchmarks"] for name, m in (evaluation.get("models") or {}).items()
              if isinstance(m, dict) and isinstance(m.get("benchmarks"), dict)}
    rows = list(dict.fromkeys((task, metric) for scores in models.values() for task, score in scores.items()
                              for metric in score.get("metrics", {})))
    if not rows:
        return []

    def cell(scores: dict, task: str, metric: str) -> str:
        entry = scores.get(task, {}).get("metrics", {}).get(metric)
        if not entry or entry.get("value") is None:
            return ""
        return _fmt(entry["value"]) + (f" ± {_fmt(entry['stderr'])}" if entry.get("stderr") is not None else "")

    harness = evaluation.get("benchmarks", {})
    limit = f", at most {harness['limit']} examples per task" if harness.get("limit") else ""
    lines = [f"Standard benchmarks ({_fmt(harness.get('harness', 'lm-evaluation-harness'))}{limit}):", "",
             "| task | metric | " + " | ".join(models) + " |", "| --- | --- |" + " --- |" * len(models)]
    lines += [f"| {_fmt(task)} | {_fmt(metric)} | " + " | ".join(cell(s, task, metric) for s in models.values()) + " |"
              for task, metric in rows]
    return lines + [""]


def model_card(name: str, src: Path, meta: dict, run: dict, reward: bool) -> str:
    stage = meta.get("stage", "unknown")
    base = meta.get("base_model")
    front = {"library_name": "transformers", "tags": ["alignloop", stage],
             "pipeline_tag": "text-classification" if reward else "text-generation"}
    if isinstance(base, str) and base and not base.startswith(("/", ".", "~")) and not Path(base).exists():
        front["base_model"] = base
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}", "",
             f"Exported by alignloop from `{src}`: stage `{stage}`"
             + (f", base model `{base}`" if base else "")
             + (", LoRA adapter merged into the base weights." if meta.get("merged") else "."), ""]
    lines += ["## Use", ""]
    if reward:
        lines += ["A reward model (sequence classification; normalisation in `alignloop.json`):", "", "```bash",
                  f"alignloop serve --model {name} --port 8001",
                  "curl localhost:8001/v1/score -H 'Content-Type: application/json' \\",
                  "  -d '{\"pairs\": [{\"prompt\": \"Hi\", \"response\": \"Hello!\"}]}'", "```", ""]
    else:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'tok = AutoTokenizer.from_pretrained("{name}")',
                  f'model = AutoModelForCausalLM.from_pretrained("{name}")',
                  'ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,',
                  '                              return_tensors="pt", return_dict=True)',
                  "print(tok.decode(model.generate(**ids, max_new_tokens=64)[0]))", "```", "",
                  f"Serve it with the OpenAI API: `alignloop serve --model {name}`.", ""]
    lines += ["## Evaluation", ""]
    if "eval" in run:
        lines += benchmark_lines(run["eval"])
        lines += ["From the run's `eval.json` (copied next to this card).", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {key} | {_fmt(value)} |" for key, value in flatten(run["eval"])]
    else:
        lines.append("The run folder held no eval.json.")
    lines += ["", "## Training data", ""]
    files = _data_files(run.get("config", {}))
    lines += [f"- `{key}`: `{path}`" for key, path in files] or ["No data paths recorded in the run config."]
    if "data_report" in run:
        lines += ["", "What cleaning, splitting and truncation did (`data_report.json`):", "", "```json",
                  json.dumps(run["data_report"], indent=2, default=str), "```"]
    lines += ["", "## Training configuration", ""]
    if "config_text" in run:
        lines += ["The run's fully resolved `config.yaml` (also copied as `training_config.yaml`):", "", "```yaml",
                  run["config_text"].rstrip(), "```"]
    else:
        lines.append("The run folder held no config.yaml.")
    lines += ["", "## alignloop metadata", "", "```json", json.dumps(meta, indent=2, default=str), "```", ""]
    return "\n".join(lines)
