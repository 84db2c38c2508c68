"""``alignloop collect``: generate K candidate responses per prompt with a model and store them in a round.

Candidates are drawn by the same sampler and with the same defaults as PPO's rollouts
(alignloop.generation, SamplingConfig), so the responses people rank come from the distribution PPO
optimises. Each candidate records which model wrote it and the exact sampling settings (temperature,
top-p, top-k, max new tokens, batch size, seed), so a round can be reproduced and rounds can be compared.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

from accelerate.utils import gather_object

from alignloop.config import ModelConfig, SamplingConfig
from alignloop.data.formats import chat_as_lines
from alignloop.data.io import read_records
from alignloop.data.tokenize import render_prompt, stop_token_ids
from alignloop.errors import UserError
from alignloop.feedback import tasks
from alignloop.feedback.db import DEFAULT_CRITERIA, open_db
from alignloop.generation.backends import make_sampler
from alignloop.generation.calls import generate_calls, my_calls, processes
from alignloop.generation.sampler import inference_device
from alignloop.models.load import load_pretrained


def read_prompts(path: str | Path) -> list[str | list[dict]]:
    """Prompts from a JSONL/CSV/parquet file: records with ``prompt`` (text) or ``messages`` (chat)."""
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
    """What annotators see: the text, or the conversation as 'role: content' turns a blank line apart."""
    if isinstance(prompt, str):
        return prompt
    return chat_as_lines(prompt, separator="\n\n")


def generate_candidates(model, tok, prompts: list[str | list[dict]], k: int, sampling: SamplingConfig) -> list[list[str]]:
    """K sampled responses per prompt, every process's in prompt order: calls of ``sampling.batch_size``
    prompts, each padded to its own longest prompt and seeded by ``sampling.seed`` and its first prompt
    (alignloop.generation.calls), each prompt's K samples in contiguous rows (the row layout of
    transformers' num_return_sequences). Under torchrun each process samples its share of the calls."""
    calls = my_calls(len(prompts), sampling.batch_size)  # first: a vLLM engine must see the processes
    stop_ids = stop_token_ids(tok, model.config, model.generation_config)
    sampler = make_sampler(model, stop_ids, tok.pad_token_id, sampling)
    # A raw text prompt gets the tokenizer's special tokens only when there is no chat template.
    ids = [tok(render_prompt(tok, p), add_special_tokens=tok.chat_template is None)["input_ids"]
           for p in prompts]
    mine: list[list[str]] = []
    rollouts = generate_calls(sampler, ids, sampling, calls, candidate_seed(sampling), "collect", repeat=k)
    for call, r in zip(calls, rollouts, strict=True):
        texts = [tok.decode(row[m.bool()], skip_special_tokens=True).strip()
                 for row, m in zip(r.response_ids, r.response_mask, strict=True)]
        mine += [texts[i * k:(i + 1) * k] for i in range(len(call))]
    return gather_object(mine)


def candidate_seed(sampling: SamplingConfig) -> int:
    return 0 if sampling.seed is None else sampling.seed


def collect(model_name: str, prompts_path: str, db_url: str, round_name: str, k: int = 4,
            sampling: SamplingConfig = SamplingConfig(batch_size=16), overlap: int = 1,
            model_label: str | None = None) -> int:
    """Generate and store; creates the round (default criteria) if it does not exist. Returns #prompts.
    The model samples on the GPU when there is one; under torchrun each process samples its share of the
    prompts and the main process writes them all, in order."""
    if k < 2:
        raise UserError("--k: at least 2 candidates per prompt are needed to rank them")
    if not 0 < sampling.temperature <= 10:
        raise UserError("--temperature must be in (0, 10]: the K candidates of a prompt are sampled")
    prompts = read_prompts(prompts_path)
    # Under torchrun every process samples its share and the main process alone writes the round.
    main = processes().is_main_process
    Sessions = open_db(db_url) if main else None
    model, tok = load_for_sampling(model_name)
    responses = generate_candidates(model, tok, prompts, k, sampling)
    if not main:
        return len(prompts)
    label = model_label or model_name
    # what was sampled and how (the vLLM engine's sizing changes nothing there)
    settings = {**sampling.model_dump(exclude={"vllm"}), "seed": candidate_seed(sampling), "k": k}
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


def load_for_sampling(model_name: str):
    """(model, tokenizer) in eval mode on the inference device (the GPU when there is one)."""
    device = inference_device()
    model, tok = load_pretrained(ModelConfig(name_or_path=model_name), device=device, for_training=False)
    return model.to(device).eval(), tok


def gold_ordered_pairs(model_name: str, prompts: list[dict], k: int, sampling: SamplingConfig,
                       gold: Callable[[str, str], float]) -> list[dict]:
    """K candidates per prompt record from the model, every pair of them ordered by ``gold(shown prompt,
    response)``; pairs the gold cannot tell apart are left out. The gold difference is kept as "margin"
    (the reward model's eval.json reports accuracy by gold margin)."""
    model, tok = load_for_sampling(model_name)
    texts = [p.get("prompt") or p.get("messages") for p in prompts]
    pairs = []
    for prompt, responses in zip(texts, generate_candidates(model, tok, texts, k, sampling), strict=True):
        shown = prompt_text(prompt)
        for a, b in itertools.combinations(responses, 2):
            ga, gb = gold(shown, a), gold(shown, b)
            if ga != gb:
                chosen, rejected = (a, b) if ga > gb else (b, a)
                pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                              "margin": round(abs(ga - gb), 4)})
    return pairs
