"""Steady-state timing of a stage built on ``training.fit``, shared by the reward-model and DPO benchmarks.

The stage module's ``fit`` is wrapped so that every step records when it starts collating and what its
micro-batches hold; a step ends when the next one starts, so a window covers collation, forward, backward,
clipping, the optimizer and all per-step bookkeeping.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import ModuleType


class FitTimer:
    """Wraps ``stage.fit``; ``describe(batch)`` gives a micro-batch's {"pairs", "tokens", "padded_tokens"}.

    A step starts when ``training.fit.micro_batches`` collates it (every micro-batch of the step at once), so
    a batch cut into pieces by ``train.micro_batch_tokens`` still counts as one step."""

    def __init__(self, stage: ModuleType, describe: Callable[[dict], dict], common: ModuleType):
        self.starts: list[float] = []
        self.batches: list[dict] = []
        self.snaps: list[tuple] = []
        self.fit_start = self.fit_end = 0.0
        self.params = 0
        # imported here, not at the top: bench scripts import this module before common sets torch's threads
        import alignloop.training.fit as fit_module

        real_fit = stage.fit
        real_micro_batches = fit_module.micro_batches

        def counting_micro_batches(*args, **kwargs):
            self.snaps.append(common.cpu_snapshot())
            self.starts.append(self.snaps[-1][0])
            pieces = real_micro_batches(*args, **kwargs)
            described = [describe(b) for b in pieces]
            self.batches.append({k: sum(d[k] for d in described) for k in described[0]})
            return pieces

        def timed_fit(model, *args, **kwargs):
            self.fit_start = time.perf_counter()
            self.params = sum(p.numel() for p in model.parameters())
            fit_module.micro_batches = counting_micro_batches
            try:
                out = real_fit(model, *args, **kwargs)
            finally:
                fit_module.micro_batches = real_micro_batches
            self.fit_end = time.perf_counter()
            return out

        stage.fit = timed_fit

    def steady_state(self, warmup: int, common: ModuleType) -> dict:
        """Figures over steps warmup+1 .. last-1 (1-based): from the start of step warmup+1 (the end of
        step ``warmup``) to the start of the last step, which also writes the final checkpoint."""
        steps = len(self.starts)
        if steps <= warmup + 1:
            sys.exit(f"only {steps} steps ran; need more than warmup + 1 = {warmup + 1}")
        secs = self.starts[-1] - self.starts[warmup]
        timed = self.batches[warmup:-1]
        pairs = sum(b["pairs"] for b in timed)
        tokens = sum(b["tokens"] for b in timed)
        padded = sum(b["padded_tokens"] for b in timed)
        return {
            "steps": steps,
            "timed_steps": steps - 1 - warmup,
            "warmup_steps": warmup,
            "timed_seconds": round(secs, 3),
            "sec_per_step": round(secs / (steps - 1 - warmup), 4),
            "pairs": pairs,
            "pairs_per_sec": round(pairs / secs, 2),
            "tokens": tokens,
            "tokens_per_sec": round(tokens / secs, 1),
            "padded_tokens": padded,
            "padding_fraction": round(1 - tokens / padded, 4) if padded else 0.0,
            "other_procs_cores": round(common.other_load(self.snaps[warmup], self.snaps[-1]), 3),
            # this process's CPU time: on a busy machine a steadier A/B figure than the wall-clock rate
            "cpu_sec_per_step": round((self.snaps[-1][2] - self.snaps[warmup][2]) / (steps - 1 - warmup), 4),
        }
