"""The request side of a streaming generation engine (serve's transformers and vLLM engines).

A request is token-id prompt + :class:`StreamRequest` (a SamplingConfig, the stop strings, how many
choices and which log-probs); the client reads its :class:`Generation` as an async stream of
:class:`Delta` text pieces, each naming its choice, fed from the engine's thread or tasks.

Log-probs are the model's own: log_softmax of the raw next-token logits the token was sampled from,
before temperature, top-k or top-p (what OpenAI and vLLM report).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter

from alignloop.config import SamplingConfig


@dataclass(frozen=True)
class StreamRequest:
    """How one streamed request samples. Stop strings live here, not in SamplingConfig: they are
    matched on the decoded text as it streams (holding back what may still become one), which only a
    streaming engine does; the batch stages end responses on token ids (EOS)."""

    sampling: SamplingConfig
    stop: tuple[str, ...] = ()
    # Choices sampled from the prompt. With a seed, choice j samples as one request seeded seed + j would.
    n: int = 1
    # Per generated token: None = no log-probs, k = the chosen token's and the k most likely tokens'.
    logprobs: int | None = None
    # The same for every prompt token after the first (echo with log-probs); None = not computed.
    prompt_logprobs: int | None = None
    # Score the prompt and generate nothing (echo with max_tokens 0); sampling.max_new_tokens is unused.
    prompt_only: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-prob and the ``k`` most likely tokens at its position, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Delta:
    """A piece of one choice's text with the log-probs of the tokens sampled since the choice's previous
    Delta; a choice's last Delta carries finish_reason and its token counts, its first the prompt's
    log-probs (positions 1.. of the prompt) when they were asked for."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


class QueueFull(Exception):
    """Every running slot and every queue place is taken."""


class EngineStopped(Exception):
    """The worker is gone (shutting down); nothing new can be generated."""


class EngineCounters(Protocol):
    """The token and outcome counters an engine updates (serve's ServeMetrics has them)."""

    prompt_tokens: Counter
    generated_tokens: Counter
    finished: Counter


class Generation:
    """The client side of one request: an async stream of Deltas of its ``params.n`` choices, fed from the
    engine's thread; it ends when every choice has finished."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: StreamRequest, on_cancel) -> None:
        self.id = next(self._ids)
        self.prompt_ids = prompt_ids
        self.params = params
        self.arrived = time.perf_counter()
        self.cancelled = False
        self.finished = False
        self._unfinished = params.n
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._on_cancel = on_cancel

    def push(self, item: Delta | BaseException) -> None:
        """Thread-safe: hand a Delta (or the error that ended the request) to the client."""
        if isinstance(item, BaseException):
            self.finished = True
        elif item.finish_reason:
            self._unfinished -= 1
            self.finished = self._unfinished == 0
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the client's event loop is gone
            self.cancelled = True

    def cancel(self) -> None:
        """The client went away or gave up: free the slot; the stream ends."""
        if self.cancelled or self.finished:
            return
        self.cancelled = True
        self._on_cancel(self)
        self._queue.put_nowait(None)

    async def stream(self) -> AsyncIterator[Delta]:
        unfinished = self.params.n
        try:
            while unfinished:
                item = await self._queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                unfinished -= bool(item.finish_reason)
        finally:
            self.cancel()


def context_length_of(config) -> int:
    """The longest sequence a model config allows (prompt + generated tokens); 2048 when it names none."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048
