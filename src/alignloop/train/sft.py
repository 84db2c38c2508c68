"""Supervised fine-tuning of a causal language model, top to bottom.

read + validate data -> clean -> split -> load model -> tokenize (completion-only labels,
truncation, optional packing) -> fit -> evaluate on validation and test -> save -> FINISHED.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from alignloop.config import DataConfig, SFTConfig
from alignloop.data.formats import parse_sft
from alignloop.data.splits import load_splits
from alignloop.data.tokenize import (
    TokenizedExample,
    collate_packed,
    collate_padded,
    ensure_chat_template,
    pack_examples,
    tokenize_sft,
)
from alignloop.models.forward import causal_lm_loss_sum
from alignloop.models.load import (
    count_parameters,
    load_pretrained,
    planned_matmul_parameters,
    prepare_for_training,
    resolve_source,
    save_model,
)
from alignloop.runs import RunDir, atomic_write_json
from alignloop.training.accelerator import make_accelerator
from alignloop.training.finish import finish_run
from alignloop.training.fit import fit
from alignloop.training.resume import SUPERVISED_MUTABLE, open_run

log = logging.getLogger(__name__)


def tokenize_all(examples: list, tokenizer, data: DataConfig, stats: Counter) -> list[TokenizedExample]:
    return [tokenize_sft(e, tokenizer, data.max_seq_len, data.min_completion_tokens, stats) for e in examples]


def lm_eval(model, examples: list[TokenizedExample], pad_id: int, batch_size: int, device) -> dict[str, float]:
    """Token-averaged loss and perplexity over labelled tokens."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate_padded(examples[i : i + batch_size], pad_id)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss, n = causal_lm_loss_sum(model, batch)
        total += loss.item()
        count += n
    mean = total / max(count, 1)
    return {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50.0)), "eval_tokens": count}


def run_sft(cfg: SFTConfig, overwrite: bool = False,
            on_eval: Callable[[int, dict[str, float]], None] | None = None) -> Path:
    """Train and evaluate a causal LM (task causal_lm; run_supervised picks the recipe of other tasks);
    ``on_eval(step, metrics)`` is handed to ``fit`` (sweeps prune through it)."""
    run = RunDir(cfg.output_dir)
    splits, data_report = load_splits(cfg.data, cfg.train.seed, parse_sft)
    resolve_source(cfg.model.name_or_path or "", cfg.model.gguf_file)  # fail on a bad path before creating the run
    acc = make_accelerator(cfg.train, run, matmul_parameters=planned_matmul_parameters(cfg.model))
    open_run(run, cfg, overwrite, SUPERVISED_MUTABLE, acc.is_main_process)
    torch.manual_seed(cfg.train.seed)  # before the model is built: a LoRA adapter is initialised randomly
    model, tokenizer = load_pretrained(cfg.model, device=acc.device, for_training=True)
    ensure_chat_template(tokenizer, cfg.data.chat_template)
    model = prepare_for_training(model, cfg.model)

    stats: Counter = Counter()
    train_ex = tokenize_all(splits["train"], tokenizer, cfg.data, stats)
    val_ex = tokenize_all(splits["validation"], tokenizer, cfg.data, stats)
    test_ex = tokenize_all(splits["test"], tokenizer, cfg.data, stats)
    data_report["truncation"] = dict(stats)
    data_report["max_seq_len"] = cfg.data.max_seq_len
    pad_id = tokenizer.pad_token_id

    if cfg.data.packing:
        items = pack_examples(train_ex, cfg.data.max_seq_len)
        data_report["packing"] = {"examples": len(train_ex), "rows": len(items), "row_len": cfg.data.max_seq_len}

        def collate(rows):
            return collate_packed(rows, pad_id)

        lengths = [sum(len(e) for e in row) for row in items]
    else:
        items = train_ex

        multiple = 64 if acc.device.type == "cuda" else 1

        def collate(batch):
            return collate_padded(batch, pad_id, multiple)

        lengths = [len(e) for e in items]

    if acc.is_main_process:
        atomic_write_json(run.root / "data_report.json", data_report)
    params = count_parameters(model)
    log.info("model: %s parameters, %s trainable", f"{params['total']:,}", f"{params['trainable']:,}")

    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size
    label_smoothing = cfg.train.label_smoothing

    def loss_fn(m, batch):
        loss, n = causal_lm_loss_sum(m, batch, label_smoothing)
        return loss, n, {}

    result = fit(model, items, collate, loss_fn, cfg.train, run,
                 evaluate=(lambda m: lm_eval(m, val_ex, pad_id, eval_bs, acc.device)) if val_ex else None,
                 lengths=lengths if cfg.train.group_by_length else None, accelerator=acc,
                 tracker_config=cfg.model_dump(mode="json"), description="sft", on_eval=on_eval)

    def final_eval(final_model) -> dict:
        evaluation: dict = {"steps": result.state.step, "stopped_early": result.state.stopped_early,
                            "best_step": result.state.best_step, "parameters": params}
        if val_ex:
            evaluation["validation"] = lm_eval(final_model, val_ex, pad_id, eval_bs, acc.device)
        if test_ex:
            evaluation["test"] = lm_eval(final_model, test_ex, pad_id, eval_bs, acc.device)
        return evaluation

    def save(final_model, state_dict: dict | None) -> None:
        save_model(final_model, tokenizer, run.model_dir,
                   meta={"stage": "sft", "task": cfg.task, "base_model": cfg.model.name_or_path,
                         "adapter": cfg.model.adapter}, state_dict=state_dict)

    return finish_run(acc, run, model, final_eval, save, {"stage": "sft"})
