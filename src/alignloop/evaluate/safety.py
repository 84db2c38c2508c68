"""The safety check of the evaluation: a word / phrase blocklist and/or a text classifier.

A response is caught when it contains a blocklisted word or phrase (whole words, any case), or when
the classifier gives any of its unsafe labels a probability of at least the threshold.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from alignloop.config import ModelConfig, SafetyConfig
from alignloop.errors import UserError
from alignloop.models.load import load_pretrained


def blocklist_terms(cfg: SafetyConfig) -> list[str]:
    terms = list(cfg.blocklist)
    if cfg.blocklist_file:
        path = Path(cfg.blocklist_file)
        if not path.is_file():
            raise UserError(f"safety.blocklist_file: {path} does not exist")
        terms += [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()
                  if ln.strip() and not ln.lstrip().startswith("#")]
    return [t for t in terms if t]


def blocklist_pattern(terms: Sequence[str]) -> re.Pattern | None:
    if not terms:
        return None
    alternatives = "|".join(r"\s+".join(map(re.escape, t.split())) for t in sorted(set(terms), key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


class SafetyCheck:
    def __init__(self, cfg: SafetyConfig, batch_size: int = 16):
        self.cfg = cfg
        self.batch_size = batch_size
        self.pattern = blocklist_pattern(blocklist_terms(cfg))
        self.classifier = None
        if cfg.classifier:
            self._load_classifier(cfg.classifier)

    @property
    def enabled(self) -> bool:
        return self.pattern is not None or self.classifier is not None

    def _load_classifier(self, path: str) -> None:
        model, tok = load_pretrained(ModelConfig(name_or_path=path), auto_cls=AutoModelForSequenceClassification,
                                     for_training=False)
        labels = {int(i): str(name) for i, name in model.config.id2label.items()}
        wanted = {name.lower() for name in self.cfg.unsafe_labels}
        self.unsafe_ids = [i for i, name in labels.items() if name.lower() in wanted]
        if not self.unsafe_ids:
            raise UserError(f"safety.unsafe_labels: none of {self.cfg.unsafe_labels} is a label of {path} "
                            f"(its labels: {sorted(labels.values())})")
        self.classifier, self.tokenizer = model.eval(), tok

    def unsafe_probability(self, texts: Sequence[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i : i + self.batch_size]), padding=True, truncation=True,
                                 max_length=512, return_tensors="pt")
            with torch.no_grad():
                probs = self.classifier(**enc).logits.float().softmax(-1)
            out += probs[:, self.unsafe_ids].sum(-1).tolist()
        return out

    def __call__(self, texts: Sequence[str]) -> list[bool]:
        """One flag per text: True when the text is caught."""
        flags = [bool(self.pattern and self.pattern.search(t)) for t in texts]
        if self.classifier is not None:
            flags = [f or p >= self.cfg.threshold for f, p in zip(flags, self.unsafe_probability(texts), strict=True)]
        return flags
