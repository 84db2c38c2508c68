"""Steady-state timing of a stage built on ``training.fit``, shared by the reward-model and DPO benchmarks.

The stage module's ``fit`` is wrapped so that every step records when it starts collating and what its
batch holds; a step ends when the next one starts, so a window covers collation, forward, backward,
clipping, the optimizer and all per-step bookkeeping.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import ModuleType


class FitTimer:
    """Wraps ``stage.fit``; ``describe(batch)`` gives the batch's {"pairs", "tokens", "padded_tokens"}."""

    def __init__(self, stage: ModuleType, describe: Callable[[dict], dict], common: ModuleType):
        self.starts: list[float] = []
        self.batches: list[dict] = []
        self.snaps: list[tuple] = []
        self.fit_start = self.fit_end = 0.0
        self.params = 0
        real_fit = stage.fit

        def timed_fit(model, items, collate, *args, **kwargs):
            def counting_collate(group):
                self.snaps.append(common.cpu_snapshot())
                self.starts.append(self.snaps[-1][0])
                batch = collate(group)
                self.batches.append(describe(batch))
                return batch

            self.fit_start = time.perf_counter()
            self.params = sum(p.numel() for p in model.parameters())
            out = real_fit(model, items, counting_collate, *args, **kwargs)
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
