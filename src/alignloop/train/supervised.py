"""``alignloop sft``'s task dispatch: one SFTConfig, three recipes (causal LM, classification, tagging)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alignloop.config import SFTConfig
from alignloop.train.classification import run_classification
from alignloop.train.sft import run_sft
from alignloop.train.tagging import run_tagging


def run_supervised(cfg: SFTConfig, overwrite: bool = False,
                   on_eval: Callable[[int, dict[str, float]], None] | None = None) -> Path:
    """Run the recipe of ``cfg.task``; ``on_eval(step, metrics)`` reaches fit (sweeps prune through it)."""
    if cfg.task == "classification":
        return run_classification(cfg, overwrite, on_eval)
    if cfg.task == "tagging":
        return run_tagging(cfg, overwrite, on_eval)
    return run_sft(cfg, overwrite, on_eval)
