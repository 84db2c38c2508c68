"""The one divergence error: a NaN/inf loss, gradient norm or reward stops the run and names the step, what
went wrong and the last good checkpoint, which resume continues from."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from alignloop.errors import TrainingDiverged
from alignloop.training.checkpoint import Checkpointer


@dataclass
class DivergenceCheck:
    ckpt: Checkpointer
    what_trains: str  # "training", "PPO": the message's subject
    advice: str  # what to change before rerunning

    def check(self, value: torch.Tensor | float, step: int, what: str) -> None:
        """Raise TrainingDiverged unless every element of ``value`` is finite; ``step`` is the step that failed."""
        if isinstance(value, torch.Tensor):
            if bool(torch.isfinite(value).all()):
                return
            shown = f"{value.item()}" if value.numel() == 1 else "NaN/inf"
        else:
            if math.isfinite(value):
                return
            shown = f"{value}"
        latest = self.ckpt.latest()
        keep = f"the last good checkpoint is kept at {latest}" if latest else "no checkpoint had been written yet"
        raise TrainingDiverged(f"{self.what_trains} diverged at step {step}: {what} is {shown}; stopped ({keep}); "
                               f"{self.advice}, then rerun to resume")
