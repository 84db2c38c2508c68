"""The end of every stage: final evaluation into eval.json, the saved model, the FINISHED marker."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from alignloop.runs import RunDir, atomic_write_json
from alignloop.training.distributed import full_state_dict


def finish_run(acc, run: RunDir, model: nn.Module, evaluate: Callable[[nn.Module], dict],
               save: Callable[[nn.Module, dict | None], None], summary: dict) -> Path:
    """Evaluate the final model (eval mode, no gradients, the run's autocast), write eval.json, save the
    model and mark the run finished (main process), wait for every process and close the trackers.

    ``evaluate(model)`` returns eval.json's content (it may write extra files on the main process);
    ``save(model, state_dict)`` writes model/ as one plain folder: ``state_dict`` is a sharded model's
    whole weights gathered on the main process (None for a plain model, which saves its own);
    ``summary`` goes into FINISHED."""
    final = acc.unwrap_model(model)
    final.eval()
    with torch.no_grad(), acc.autocast():
        evaluation = evaluate(final)
    weights = full_state_dict(final)  # every process takes part in gathering the shards
    if acc.is_main_process:
        atomic_write_json(run.root / "eval.json", evaluation)
        save(final, weights)
        run.mark_finished(summary)
    acc.wait_for_everyone()
    # Not acc.end_training(): it also tears down the process group, which the caller may still need.
    for tracker in acc.trackers:
        tracker.finish()
    return run.root
