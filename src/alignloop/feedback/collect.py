"""``alignloop collect``: generate K candidate responses per prompt with a model and store them in a round.

Each candidate records which model wrote it and the exact sampling settings (temperature, top-p,
top-k, max new tokens, seed), so a round can be reproduced and rounds can be compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignloop.errors import UserError


def read_prompts(path: str | Path) -> list[str | list[dict]]:
    """Prompts from a JSONL/CSV/parquet file: records with ``prompt`` (text) or ``messages`` (chat)."""
    from alignloop.data.io import read_records

    out: list[str | list[dict]] = []
    for rec in read_records(path):
        if isinstance(rec.data.get("prompt"), str) and rec.data["prompt"].strip():
            out.append(rec.data["prompt"])
        elif isinstance(rec.data.get("messages"), list) and rec.data["messages"]:
            out.append(rec.data["messages"])
        else:
            raise UserError(f"{rec.where}: field 'prompt': a prompt record needs 'prompt' (text) or 'messages'")
    if not out:
        raise UserError(f"{path}: no prompts")
    return out


def prompt_text(prompt: str | list[dict]) -> str:
    """What annotators see: the text, or the conversation as 'role: content' lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)


def generate_candidates(model, tok, prompts: list[str | list[dict]], k: int, settings: dict[str, Any],
                        batch_size: int = 8) -> list[list[str]]:
    """K sampled responses per prompt (transformers ``generate``, left-padded batches)."""
    import torch
    from tqdm.auto import tqdm

    from alignloop.data.tokenize import render_prompt

    torch.manual_seed(settings["seed"])
    tok.padding_side = "left"
    out: list[list[str]] = []
    gen_kwargs = dict(do_sample=True, temperature=settings["temperature"], top_p=settings["top_p"],
                      top_k=settings["top_k"], max_new_tokens=settings["max_new_tokens"], num_return_sequences=k,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    for start in tqdm(range(0, len(prompts), batch_size), desc="collect", unit="batch"):
        texts = [render_prompt(tok, p) for p in prompts[start:start + batch_size]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=tok.chat_template is None)
        with torch.no_grad():
            ids = model.generate(**enc, **gen_kwargs)
        new = ids[:, enc["input_ids"].shape[1]:]
        decoded = tok.batch_decode(new, skip_special_tokens=True)
        out += [[d.strip() for d in decoded[i * k:(i + 1) * k]] for i in range(len(texts))]
    return out


def collect(model_name: str, prompts_path: str, db_url: str, round_name: str, k: int = 4,
            temperature: float = 1.0, top_p: float = 0.95, top_k: int = 50, max_new_tokens: int = 128,
            seed: int = 0, overlap: int = 1, batch_size: int = 8, model_label: str | None = None) -> int:
    """Generate and store; creates the round (default criteria) if it does not exist. Returns #prompts."""
    from alignloop.config import ModelConfig
    from alignloop.feedback import tasks
    from alignloop.feedback.db import DEFAULT_CRITERIA, open_db
    from alignloop.models.load import load_pretrained

    if k < 2:
        raise UserError("--k: at least 2 candidates per prompt are needed to rank them")
    if not 0 < temperature <= 10 or not 0 < top_p <= 1:
        raise UserError("--temperature must be in (0, 10] and --top-p in (0, 1]")
    prompts = read_prompts(prompts_path)
    Sessions = open_db(db_url)
    model, tok = load_pretrained(ModelConfig(name_or_path=model_name), for_training=False)
    model.eval()
    settings = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens,
                "seed": seed, "do_sample": True, "k": k}
    responses = generate_candidates(model, tok, prompts, k, settings, batch_size)
    label = model_label or model_name
    items = [{"prompt": prompt_text(p), "messages": p if isinstance(p, list) else None,
              "responses": [{"text": r, "model": label, "generation": {**settings, "sample": j}}
                            for j, r in enumerate(rs)]}
             for p, rs in zip(prompts, responses, strict=True)]
    with Sessions() as db:
        try:
            rnd = tasks.get_round(db, round_name)
        except tasks.NotFound:
            rnd = tasks.create_round(db, round_name, [dict(c) for c in DEFAULT_CRITERIA], overlap=overlap)
        try:
            tasks.add_items(db, rnd, items)
        except tasks.Invalid as exc:
            raise UserError(f"{prompts_path}: {exc}") from None
    return len(items)
