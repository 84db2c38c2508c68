"""Sequence classification (sentiment, topics, intents), top to bottom.

read + validate {"text", "label"} records -> clean -> split -> label map from the training labels
-> load the backbone with a new classification head (AutoModelForSequenceClassification: encoders
pool their first token, decoders their last non-padding token) -> tokenize -> fit (cross-entropy,
optional class weights and label smoothing; early stopping on accuracy / macro-F1 / loss) ->
validation and test metrics into eval.json, predictions.<split>.jsonl -> save (label map in the
model config and in alignloop.json) -> FINISHED.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from transformers import AutoModelForSequenceClassification

from alignloop.config import SFTConfig
from alignloop.data.batching import length_batches, right_pad
from alignloop.data.formats import LabelledText, validate_record
from alignloop.data.io import Record
from alignloop.data.splits import load_splits
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
from alignloop.train.metrics import classification_metrics
from alignloop.training.accelerator import make_accelerator
from alignloop.training.finish import finish_run
from alignloop.training.fit import fit
from alignloop.training.resume import SUPERVISED_MUTABLE, open_run

log = logging.getLogger(__name__)

METRICS = ("eval_loss", "eval_accuracy", "eval_macro_f1")


@dataclass
class LabelledExample:
    text: str
    label: str | int
    where: str


def parse_labelled(rec: Record) -> LabelledExample:
    r = validate_record(LabelledText, rec)
    return LabelledExample(r.text, r.label, rec.where)


def label_names(examples: Sequence[LabelledExample]) -> tuple[list[str], str]:
    """Class names in a stable order (numeric when every label is an integer) and the label type."""
    values = {e.label for e in examples}
    if all(isinstance(v, int) for v in values):
        return [str(v) for v in sorted(values)], "int"
    return sorted(str(v) for v in values), "str"




def encode_texts(tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    return tokenizer(list(texts), truncation=True, max_length=max_len)["input_ids"] if texts else []


def collate_classification(ids: list[list[int]], labels: list[int], pad_id: int) -> dict:
    input_ids, mask = right_pad(ids, pad_id)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor(labels, dtype=torch.long),
            "loss_units": len(labels), "tokens": int(mask.sum())}


@torch.no_grad()
def class_probabilities(model, ids: list[list[int]], pad_id: int, batch_size: int, device) -> torch.Tensor:
    """Softmax probabilities, one row per input, in input order."""
    probs = torch.empty((len(ids), model.config.num_labels))
    for batch in length_batches([len(x) for x in ids], batch_size):
        input_ids, mask = right_pad([ids[i] for i in batch], pad_id)
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        probs[batch] = logits.float().softmax(-1).cpu()
    return probs


def evaluate_split(model, examples: list[LabelledExample], ids: list[list[int]], names: list[str], pad_id: int,
                   batch_size: int, device) -> tuple[dict, list[dict]]:
    """Metrics (with the mean cross-entropy) and one prediction row per example."""
    probs = class_probabilities(model, ids, pad_id, batch_size, device)
    gold = torch.tensor([names.index(str(e.label)) for e in examples])
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), gold).item()
    pred = probs.argmax(-1).tolist()
    metrics = {"loss": loss, **classification_metrics([names[g] for g in gold.tolist()], [names[p] for p in pred],
                                                      names)}
    rows = [{"where": e.where, "text": e.text, "label": str(e.label), "prediction": names[p],
             "probabilities": {n: round(float(x), 6) for n, x in zip(names, pr, strict=True)}}
            for e, p, pr in zip(examples, pred, probs.tolist(), strict=True)]
    return metrics, rows


def class_weights(train_ids: list[int], n_classes: int) -> torch.Tensor:
    """scikit-learn's "balanced" weights: n_examples / (n_classes * n_in_class)."""
    w = compute_class_weight("balanced", classes=np.arange(n_classes), y=np.array(train_ids))
    return torch.tensor(w, dtype=torch.float32)


def run_classification(cfg: SFTConfig, overwrite: bool = False,
                       on_eval: Callable[[int, dict[str, float]], None] | None = None) -> Path:
    check_metric(cfg, METRICS)
    run = RunDir(cfg.output_dir)
    splits, data_report = load_splits(cfg.data, cfg.train.seed, parse_labelled)
    names, label_type = label_names(splits["train"])
    if len(names) < 2:
        raise UserError(f"{cfg.data.train}: field 'label': only one class ({names[0]!r}) in the training data")
    check_known(splits["validation"] + splits["test"], set(names), "label", lambda e: [str(e.label)])
    data_report["labels"] = dict(Counter(str(e.label) for e in splits["train"]))
    id2label = dict(enumerate(names))
    labels = {"id2label": id2label, "label2id": {n: i for i, n in id2label.items()}}
    acc = make_accelerator(cfg.train, run,
                           matmul_parameters=planned_matmul_parameters(cfg.model, AutoModelForSequenceClassification, labels))
    open_run(run, cfg, overwrite, SUPERVISED_MUTABLE, acc.is_main_process)
    torch.manual_seed(cfg.train.seed)  # before the model is built: the new head and a LoRA adapter are random
    model, tokenizer = load_pretrained(
        cfg.model, auto_cls=AutoModelForSequenceClassification, device=acc.device, for_training=True,
        config_overrides=labels)
    model = prepare_for_training(model, cfg.model, task_type="SEQ_CLS")
    pad_id = tokenizer.pad_token_id

    max_len = cfg.data.max_seq_len
    ids = {k: encode_texts(tokenizer, [e.text for e in v], max_len) for k, v in splits.items()}
    train_labels = [names.index(str(e.label)) for e in splits["train"]]
    data_report["truncated"] = {k: sum(len(x) >= max_len for x in v) for k, v in ids.items()}
    items = list(zip(ids["train"], train_labels, strict=True))

    def collate(batch):
        return collate_classification([b[0] for b in batch], [b[1] for b in batch], pad_id)

    if acc.is_main_process:
        atomic_write_json(run.root / "data_report.json", data_report)
    params = count_parameters(model)
    log.info("model: %s parameters, %s trainable; %d classes", f"{params['total']:,}",
             f"{params['trainable']:,}", len(names))

    weights = class_weights(train_labels, len(names)).to(acc.device) if cfg.train.class_weighting == "balanced" \
        else None
    smoothing = cfg.train.label_smoothing
    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size

    def loss_fn(m, batch):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        loss = F.cross_entropy(logits, batch["labels"], weight=weights, label_smoothing=smoothing, reduction="sum")
        correct = (logits.argmax(-1) == batch["labels"]).sum().item()
        return loss, batch["loss_units"], {"accuracy": correct}

    def evaluate(m) -> dict[str, float]:
        metrics, _ = evaluate_split(m, splits["validation"], ids["validation"], names, pad_id, eval_bs, acc.device)
        return {"eval_loss": metrics["loss"], "eval_accuracy": metrics["accuracy"],
                "eval_macro_f1": metrics["macro_f1"]}

    result = fit(model, items, collate, loss_fn, cfg.train, run,
                 evaluate=evaluate if splits["validation"] else None,
                 lengths=[len(x) for x in ids["train"]] if cfg.train.group_by_length else None, accelerator=acc,
                 tracker_config=cfg.model_dump(mode="json"), description="classification", on_eval=on_eval)

    def final_eval(final_model) -> dict:
        evaluation: dict = {"task": "classification", "labels": names, "steps": result.state.step,
                            "stopped_early": result.state.stopped_early, "best_step": result.state.best_step,
                            "parameters": params}
        for split in ("validation", "test"):
            if splits[split]:
                metrics, rows = evaluate_split(final_model, splits[split], ids[split], names, pad_id, eval_bs,
                                               acc.device)
                evaluation[split] = metrics
                if acc.is_main_process:
                    write_jsonl(run.root / f"predictions.{split}.jsonl", rows)
        log.info("%s", json.dumps({k: evaluation[k]["accuracy"] for k in ("validation", "test") if k in evaluation}))
        return evaluation

    def save(final_model, state_dict: dict | None) -> None:
        save_model(final_model, tokenizer, run.model_dir,
                   meta={"stage": "sft", "task": "classification", "base_model": cfg.model.name_or_path,
                         "adapter": cfg.model.adapter, "labels": names, "label_type": label_type,
                         "max_seq_len": max_len}, state_dict=state_dict)

    return finish_run(acc, run, model, final_eval, save, {"stage": "sft", "task": "classification"})
