"""``alignloop predict``: run a trained SFT model over a file and write one JSON line per record.

The task comes from the model folder's alignloop.json: classification adds ``prediction`` (a label)
and ``probabilities`` (label -> probability); tagging adds ``predicted_tags`` (one per word of
``tokens``); a causal LM adds ``generation`` (the completion of ``prompt`` or ``messages``).
Every input field is kept, so gold labels sit next to predictions.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

from alignloop.config import ModelConfig, SamplingConfig
from alignloop.data.formats import PlainText, Words, validate_record
from alignloop.data.io import read_records
from alignloop.data.tokenize import ensure_chat_template, render_prompt, stop_token_ids
from alignloop.errors import UserError
from alignloop.generation.backends import make_sampler
from alignloop.generation.sampler import inference_device
from alignloop.models.load import load_pretrained, read_meta
from alignloop.runs import atomic_write_text, to_json
from alignloop.train.classification import class_probabilities, encode_texts
from alignloop.train.tagging import encode_words, predict_word_tags


def _read_inputs(path: str, fmt: str, field: str) -> list:
    records = read_records(path, fmt)
    for rec in records:
        if field not in rec.data:
            raise UserError(f"{rec.where}: field '{field}' is missing")
    return records


def predict_classification(model_dir: Path, meta: dict, records: list, batch_size: int, device) -> list[dict]:
    names = meta["labels"]
    id2label = dict(enumerate(names))
    model, tok = load_pretrained(ModelConfig(name_or_path=str(model_dir)), AutoModelForSequenceClassification,
                                 device=device, for_training=False,
                                 config_overrides={"id2label": id2label, "label2id": {n: i for i, n in id2label.items()}})
    model.to(device).eval()
    texts = [validate_record(PlainText, r).text for r in records]
    probs = class_probabilities(model, encode_texts(tok, texts, meta.get("max_seq_len", 512)), tok.pad_token_id,
                                batch_size, device)
    as_int = meta.get("label_type") == "int"
    out = []
    for rec, p in zip(records, probs.tolist(), strict=True):
        best = names[max(range(len(names)), key=p.__getitem__)]
        out.append({**rec.data, "prediction": int(best) if as_int else best,
                    "probabilities": {n: round(x, 6) for n, x in zip(names, p, strict=True)}})
    return out


def predict_tagging(model_dir: Path, meta: dict, records: list, batch_size: int, device) -> list[dict]:
    names = meta["labels"]
    id2label = dict(enumerate(names))
    model, tok = load_pretrained(ModelConfig(name_or_path=str(model_dir)), AutoModelForTokenClassification,
                                 device=device, for_training=False,
                                 config_overrides={"id2label": id2label, "label2id": {n: i for i, n in id2label.items()}})
    model.to(device).eval()
    words = [validate_record(Words, r).tokens for r in records]
    encoded = [encode_words(tok, w, meta.get("max_seq_len", 512)) for w in words]
    tags, _ = predict_word_tags(model, encoded, names, tok.pad_token_id, batch_size, device)
    return [{**rec.data, "predicted_tags": t} for rec, t in zip(records, tags, strict=True)]


def predict_causal_lm(model_dir: Path, records: list, device, sampling: SamplingConfig) -> list[dict]:
    """The completion of every record's prompt by the one sampler, after seeding torch with sampling.seed."""
    model, tok = load_pretrained(ModelConfig(name_or_path=str(model_dir)), device=device, for_training=False)
    model.to(device).eval()
    ensure_chat_template(tok)
    # The rendered prompt holds whatever special tokens the template wants; none are added on top.
    ids = [tok(render_prompt(tok, _prompt(rec)), add_special_tokens=False)["input_ids"] for rec in records]
    torch.manual_seed(0 if sampling.seed is None else sampling.seed)
    stop_ids = stop_token_ids(tok, model.config, model.generation_config)
    sampler = make_sampler(model, stop_ids, tok.pad_token_id, sampling)
    r = sampler.generate(ids, sampling, desc="generate")
    texts = [tok.decode(row[m.bool()], skip_special_tokens=True)
             for row, m in zip(r.response_ids, r.response_mask, strict=True)]
    return [{**rec.data, "generation": t} for rec, t in zip(records, texts, strict=True)]


def _prompt(rec) -> str | list[dict]:
    """The text to continue, or the conversation so far (a trailing assistant turn is what the model
    is asked to write, so it is dropped)."""
    messages = rec.data.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise UserError(f"{rec.where}: field 'messages': must be a list of {{role, content}} objects")
        return messages[:-1] if messages[-1]["role"] == "assistant" and len(messages) > 1 else messages
    prompt = rec.data.get("prompt")
    if not isinstance(prompt, str):
        raise UserError(f"{rec.where}: field 'prompt': a text prompt (or 'messages') is needed to generate from")
    return prompt


def predict(model_dir: str | Path, data: str, output: str | Path, data_format: str = "auto", batch_size: int = 32,
            sampling: SamplingConfig = SamplingConfig(temperature=0.0, seed=0)) -> Path:
    """``batch_size`` batches classification and tagging; a causal LM generates ``sampling.batch_size``
    prompts per call (default: ``batch_size``). Predictions are greedy unless sampling.temperature > 0."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise UserError(f"model folder not found: {folder}")
    meta = read_meta(folder)
    task = meta.get("task", "causal_lm")
    device = inference_device()
    if task == "classification":
        rows = predict_classification(folder, meta, _read_inputs(data, data_format, "text"), batch_size, device)
    elif task == "tagging":
        rows = predict_tagging(folder, meta, _read_inputs(data, data_format, "tokens"), batch_size, device)
    elif task == "causal_lm":
        if sampling.batch_size is None:
            sampling = sampling.model_copy(update={"batch_size": batch_size})
        rows = predict_causal_lm(folder, read_records(data, data_format), device, sampling)
    else:
        raise UserError(f"{folder / 'alignloop.json'}: field 'task': unknown task {task!r}")
    out = Path(output)
    atomic_write_text(out, "".join(to_json(r, indent=None) + "\n" for r in rows))
    return out
