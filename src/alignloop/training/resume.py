"""Resume that tells the truth.

An unfinished run continues from its latest checkpoint. Its stored config.yaml is compared with the
config of the new invocation first: settings a stage lists as mutable (learning rates, step counts,
logging, ...) are applied and named in one warning; any other difference (model, data, batch shape, seed,
...) would make the continued run something nobody asked for, so it stops with one line naming the keys.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel
from torch import nn

from alignloop.config import dump_config, read_yaml
from alignloop.errors import UserError
from alignloop.runs import RunDir
from alignloop.training.checkpoint import Checkpointer
from alignloop.training.optim import set_base_lrs

log = logging.getLogger(__name__)

# Settings every training stage may change on resume: where the run writes and what it reports.
OUTPUT_KEYS = frozenset({"output_dir", "train.report_to", "train.log_steps", "train.save_steps",
                         "train.save_total_limit"})
# fit() reads these from the config at every step, so a resumed run follows the new values (the
# learning rate is put into the restored optimizer and schedule by ``resume``).
SUPERVISED_MUTABLE = OUTPUT_KEYS | frozenset({
    "train.lr", "train.epochs", "train.max_steps", "train.eval_steps", "train.eval_batch_size",
    "train.early_stopping_patience", "train.load_best_at_end", "train.max_grad_norm",
    "train.gradient_checkpointing", "train.micro_batch_tokens"})


_MISSING = object()  # a key absent from one of two configs differs from every value, None included


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(stored: dict, new: dict, mutable: Collection[str]) -> tuple[list[str], list[str]]:
    """Dotted keys whose value differs between two config trees (a key present in only one of them
    counts as changed), split into (mutable, immutable). A key is mutable when it or a parent is listed."""
    a, b = flatten(stored), flatten(new)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING))

    def is_mutable(key: str) -> bool:
        parts = key.split(".")
        return any(".".join(parts[:i]) in mutable for i in range(1, len(parts) + 1))

    return [k for k in changed if is_mutable(k)], [k for k in changed if not is_mutable(k)]


def _as_stored(cfg: BaseModel) -> dict:
    """The config as config.yaml holds it (tuples as lists, YAML's float spelling)."""
    return yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def open_run(run: RunDir, cfg: BaseModel, overwrite: bool, mutable: Collection[str],
             main: bool = True) -> list[str]:
    """Prepare the run folder (see RunDir.prepare), check a resumed run's config against the stored one and
    write the new config.yaml. Returns the changed mutable keys (a fresh run: none)."""
    run.prepare(overwrite)
    changed: list[str] = []
    stored_path = run.root / "config.yaml"
    if Checkpointer(run.checkpoints).latest() is not None and stored_path.is_file():
        stored = read_yaml(stored_path)
        new = _as_stored(cfg)
        changed, refused = config_changes(stored, new, mutable)
        if refused:
            raise UserError(f"{run.root}: cannot resume this unfinished run: {', '.join(refused)} changed since "
                            "it started; restore them, or pass --overwrite to start over")
        if changed and main:
            old, now = flatten(stored), flatten(new)
            log.warning("resuming %s with changed settings, applied: %s", run.root,
                        "; ".join(f"{k} {old.get(k)!r} -> {now.get(k)!r}" for k in changed))
    if main:
        dump_config(cfg, stored_path)
    return changed


def resume(ckpt: Checkpointer, model: nn.Module, optimizer: torch.optim.Optimizer,
           scheduler: torch.optim.lr_scheduler.LambdaLR,
           tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> tuple[Path, dict] | None:
    """Load the latest checkpoint (trainable weights, optimizer, schedule, RNG states, the named ``tensors``
    in place) into the freshly built model, optimizer and schedule; None when there is none. The peak
    learning rates stay those the current config gave the fresh optimizer, so a changed ``lr`` (or a
    critic's) takes effect from the next step."""
    latest = ckpt.latest()
    if latest is None:
        return None
    configured = list(scheduler.base_lrs)
    saved = ckpt.load(latest, model, optimizer, tensors)
    scheduler.load_state_dict(saved["scheduler"])
    if list(scheduler.base_lrs) != configured:
        set_base_lrs(optimizer, scheduler, configured)
    return latest, saved
