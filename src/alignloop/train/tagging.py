"""Token tagging (named-entity recognition and other BIO tasks), top to bottom.

read + validate {"tokens", "tags"} records (JSONL or CoNLL) -> IOB1 tags rewritten as BIO -> split
-> tag set from training -> load the backbone with a token-classification head -> tokenize
pre-split words (fast tokenizer word_ids: each word's first sub-token carries its tag, the other
sub-tokens are ignored) -> fit (token cross-entropy; early stopping on entity F1) -> entity-level
validation and test scores (seqeval) into eval.json, tags mapped back to words in
predictions.<split>.jsonl -> save -> FINISHED.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForTokenClassification

from alignloop.config import SFTConfig
from alignloop.data.batching import length_batches, right_pad
from alignloop.data.formats import TaggedTokens, validate_record
from alignloop.data.io import Record
from alignloop.data.splits import load_splits
from alignloop.data.tokenize import IGNORE, TokenizedExample, collate_padded
from alignloop.errors import UserError
from alignloop.models.load import (
    count_parameters,
    load_pretrained,
    planned_matmul_parameters,
    prepare_for_training,
    save_model,
)
from alignloop.runs import RunDir, atomic_write_json
from alignloop.train.labelled import check_known, check_metric, write_jsonl
from alignloop.train.metrics import tagging_metrics
from alignloop.training.accelerator import make_accelerator
from alignloop.training.finish import finish_run
from alignloop.training.fit import fit
from alignloop.training.resume import SUPERVISED_MUTABLE, open_run

log = logging.getLogger(__name__)

METRICS = ("eval_loss", "eval_f1", "eval_precision", "eval_recall", "eval_token_accuracy")


@dataclass
class TaggedExample:
    tokens: list[str]
    tags: list[str]
    where: str


def parse_tagged(rec: Record) -> TaggedExample:
    r = validate_record(TaggedTokens, rec)
    for i, tag in enumerate(r.tags):
        if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
            raise UserError(f"{rec.where}: field 'tags': {tag!r} (tag {i + 1}) is not a BIO tag "
                            "(O, B-TYPE or I-TYPE)")
    return TaggedExample(r.tokens, r.tags, rec.where)


def to_bio(tags: Sequence[str]) -> tuple[list[str], int]:
    """IOB1 -> BIO: IOB1 opens an entity with I- (B- only splits two adjacent same-type entities);
    BIO always opens with B-. An I-X that does not continue an X entity becomes B-X. BIO input is
    returned unchanged. Returns the tags and how many were rewritten."""
    out: list[str] = []
    changed = 0
    prev = "O"
    for tag in tags:
        if tag.startswith("I-") and prev[2:] != tag[2:]:
            tag = "B-" + tag[2:]
            changed += 1
        out.append(tag)
        prev = tag
    return out, changed


def tag_names(examples: Sequence[TaggedExample]) -> list[str]:
    """O, then B-/I- for every entity type seen in training, types in alphabetical order."""
    types = sorted({t[2:] for e in examples for t in e.tags if t != "O"})
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def encode_words(tokenizer, words: list[str], max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and, per word, the position of its first sub-token (-1: the word was truncated away
    or produced no token)."""
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_len)
    first = [-1] * len(words)
    for pos, w in enumerate(enc.word_ids()):
        if w is not None and first[w] == -1:
            first[w] = pos
    return enc["input_ids"], first


def first_subtoken_labels(n_tokens: int, first: list[int], tag_ids: list[int]) -> list[int]:
    labels = [IGNORE] * n_tokens
    for pos, t in zip(first, tag_ids, strict=True):
        if pos >= 0:
            labels[pos] = t
    return labels


@torch.no_grad()
def predict_word_tags(model, encoded: list[tuple[list[int], list[int]]], names: list[str], pad_id: int,
                      batch_size: int, device, labels: list[list[int]] | None = None
                      ) -> tuple[list[list[str]], float | None]:
    """Tag per word from its first sub-token's argmax (words without a token get "O"); given
    ``labels`` (per-token tag ids, IGNORE elsewhere), also the mean token loss of the same pass."""
    out: list[list[str]] = [[] for _ in encoded]
    total, count = 0.0, 0
    for batch in length_batches([len(ids) for ids, _ in encoded], batch_size):
        input_ids, mask = right_pad([encoded[i][0] for i in batch], pad_id)
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        if labels is not None:
            gold = torch.full(input_ids.shape, IGNORE, dtype=torch.long)
            for row, i in enumerate(batch):
                gold[row, : len(labels[i])] = torch.tensor(labels[i], dtype=torch.long)
            total += F.cross_entropy(logits.flatten(0, 1), gold.flatten(), ignore_index=IGNORE,
                                     reduction="sum").item()
            count += int((gold != IGNORE).sum())
        pred = logits.argmax(-1)
        for row, i in enumerate(batch):
            out[i] = [names[pred[row, pos]] if pos >= 0 else "O" for pos in encoded[i][1]]
    return out, (total / max(count, 1) if labels is not None else None)


def evaluate_split(model, examples: list[TaggedExample], encoded, items: list[TokenizedExample], names: list[str],
                   pad_id: int, batch_size: int, device) -> tuple[dict, list[dict]]:
    pred, loss = predict_word_tags(model, encoded, names, pad_id, batch_size, device, [it.labels for it in items])
    metrics = {"loss": loss, **tagging_metrics([e.tags for e in examples], pred)}
    rows = [{"where": e.where, "tokens": e.tokens, "tags": e.tags, "predicted_tags": p}
            for e, p in zip(examples, pred, strict=True)]
    return metrics, rows


def run_tagging(cfg: SFTConfig, overwrite: bool = False,
                on_eval: Callable[[int, dict[str, float]], None] | None = None) -> Path:
    check_metric(cfg, METRICS)
    run = RunDir(cfg.output_dir)
    # Text cleaning works on text fields; a tagging record has none, so "empty text" must not drop it.
    data_cfg = cfg.data.model_copy(update={"clean": cfg.data.clean.model_copy(update={"drop_empty": False})})
    splits, data_report = load_splits(data_cfg, cfg.train.seed, parse_tagged)
    rewritten = Counter()
    for split, examples in splits.items():
        for e in examples:
            e.tags, n = to_bio(e.tags)
            rewritten[split] += n
    if sum(rewritten.values()):
        log.info("IOB1 tags detected: %s entity starts rewritten as B- (BIO)", dict(rewritten))
        data_report["iob1_to_bio"] = dict(rewritten)
    names = tag_names(splits["train"])
    if len(names) < 2:
        raise UserError(f"{cfg.data.train}: field 'tags': no entity tags in the training data (only 'O')")
    check_known(splits["validation"] + splits["test"], set(names), "tags", lambda e: e.tags)
    data_report["entity_types"] = sorted({n[2:] for n in names if n != "O"})
    id2label = dict(enumerate(names))
    labels = {"id2label": id2label, "label2id": {n: i for i, n in id2label.items()}}
    acc = make_accelerator(cfg.train, run,
                           matmul_parameters=planned_matmul_parameters(cfg.model, AutoModelForTokenClassification, labels))
    open_run(run, cfg, overwrite, SUPERVISED_MUTABLE, acc.is_main_process)
    torch.manual_seed(cfg.train.seed)  # before the model is built: the new head and a LoRA adapter are random
    model, tokenizer = load_pretrained(
        cfg.model, auto_cls=AutoModelForTokenClassification, device=acc.device, for_training=True,
        config_overrides=labels)
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{cfg.model.name_or_path}: task tagging needs a fast tokenizer (word alignment)")
    model = prepare_for_training(model, cfg.model, task_type="TOKEN_CLS")
    pad_id = tokenizer.pad_token_id
    max_len = cfg.data.max_seq_len
    index = {n: i for i, n in enumerate(names)}

    encoded, items = {}, {}
    for split, examples in splits.items():
        encoded[split] = [encode_words(tokenizer, e.tokens, max_len) for e in examples]
        items[split] = [TokenizedExample(ids, first_subtoken_labels(len(ids), first, [index[t] for t in e.tags]))
                        for e, (ids, first) in zip(examples, encoded[split], strict=True)]
        data_report.setdefault("words_without_token", {})[split] = sum(
            f.count(-1) for _, f in encoded[split])

    def collate(batch):
        return collate_padded(batch, pad_id)

    if acc.is_main_process:
        atomic_write_json(run.root / "data_report.json", data_report)
    params = count_parameters(model)
    log.info("model: %s parameters, %s trainable; %d tags", f"{params['total']:,}", f"{params['trainable']:,}",
             len(names))

    smoothing = cfg.train.label_smoothing
    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size

    def loss_fn(m, batch):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"]
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                               label_smoothing=smoothing, reduction="sum")
        correct = ((logits.argmax(-1) == labels) & (labels != IGNORE)).sum().item()
        return loss, batch["loss_units"], {"accuracy": correct}

    def evaluate(m) -> dict[str, float]:
        metrics, _ = evaluate_split(m, splits["validation"], encoded["validation"], items["validation"], names,
                                    pad_id, eval_bs, acc.device)
        return {f"eval_{k}": metrics[k] for k in ("loss", "f1", "precision", "recall", "token_accuracy")}

    result = fit(model, items["train"], collate, loss_fn, cfg.train, run,
                 evaluate=evaluate if splits["validation"] else None,
                 lengths=[len(x) for x in items["train"]] if cfg.train.group_by_length else None, accelerator=acc,
                 tracker_config=cfg.model_dump(mode="json"), description="tagging", on_eval=on_eval)

    def final_eval(final_model) -> dict:
        evaluation: dict = {"task": "tagging", "tags": names, "steps": result.state.step,
                            "stopped_early": result.state.stopped_early, "best_step": result.state.best_step,
                            "parameters": params}
        for split in ("validation", "test"):
            if splits[split]:
                metrics, rows = evaluate_split(final_model, splits[split], encoded[split], items[split], names,
                                               pad_id, eval_bs, acc.device)
                evaluation[split] = metrics
                if acc.is_main_process:
                    write_jsonl(run.root / f"predictions.{split}.jsonl", rows)
        return evaluation

    def save(final_model, state_dict: dict | None) -> None:
        save_model(final_model, tokenizer, run.model_dir,
                   meta={"stage": "sft", "task": "tagging", "base_model": cfg.model.name_or_path,
                         "adapter": cfg.model.adapter, "labels": names, "max_seq_len": max_len}, state_dict=state_dict)

    return finish_run(acc, run, model, final_eval, save, {"stage": "sft", "task": "tagging"})
