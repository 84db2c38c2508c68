"""A stage's generation calls and the processes that make them.

Prompts are cut into calls of ``generation.batch_size`` prompts (one call for all of them when it is
null), each call is seeded by its first prompt (``rollout_seed``) inside a forked RNG, and the processes
of a torchrun launch take contiguous runs of whole calls. So every call holds the same prompts, padded
the same way, and draws from the same seed whatever the number of processes: N processes sample exactly
what one samples, and gathering their results in process order gives the prompts' order back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from alignloop.config import SamplingConfig
from alignloop.generation.rollout import Rollout
from alignloop.generation.sampler import Sampler


def rollout_seed(seed: int, step: int, first_row: int) -> int:
    """The torch seed of the generation call that samples a step's rows from ``first_row`` on: a function
    of the row, not of the process that samples it, so N processes draw what one process draws. A stage
    that samples once (collect, eval) is step 0 and counts its rows in prompts."""
    return (seed * 1_000_003 + step) * 1_000_003 + first_row


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's CPU RNG (and the GPUs', through ``manual_seed``) seeded with ``seed`` inside the block; the CPU
    stream is restored after it, so the calls of a stage do not consume the caller's draws."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def call_ranges(n_prompts: int, per_call: int | None) -> list[range]:
    """The prompts of each generation call: ``per_call`` at a time, the last call the rest; all in one call
    when ``per_call`` is None (``generation.batch_size: null``)."""
    per_call = per_call or n_prompts
    return [range(start, min(start + per_call, n_prompts)) for start in range(0, n_prompts, per_call)]


def process_share(calls: Sequence[range], rank: int, world: int) -> list[range]:
    """The calls process ``rank`` of ``world`` makes: a contiguous run of whole calls, the first
    ``len(calls) % world`` processes one call more than the others (a process may get none)."""
    base, extra = divmod(len(calls), world)
    start = rank * base + min(rank, extra)
    return list(calls[start: start + base + (rank < extra)])


def processes() -> PartialState:
    """The processes of this launch (accelerate's state, as the training stages' accelerator sets it up:
    one outside torchrun; under torchrun the process group, over gloo on CPU)."""
    return PartialState(cpu=not torch.cuda.is_available())


def my_calls(n_prompts: int, per_call: int | None) -> list[range]:
    """This process's share of the calls over ``n_prompts`` (all of them outside a torchrun launch)."""
    state = processes()
    return process_share(call_ranges(n_prompts, per_call), state.process_index, state.num_processes)


def generate_calls(sampler: Sampler, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig,
                   calls: Sequence[range], seed: int, desc: str, **generate_kwargs) -> list[Rollout]:
    """One rollout per call, each drawn from ``rollout_seed(seed, 0, its first prompt)``; ``prompt_ids``
    holds every prompt of the stage (a call picks its own). The progress bar is the main process's."""
    out = []
    for call in tqdm(calls, desc=desc, unit="call", leave=False, disable=not processes().is_main_process):
        with seeded(rollout_seed(seed, 0, call.start)):
            out.append(sampler.generate([prompt_ids[i] for i in call], sampling, **generate_kwargs))
    return out
