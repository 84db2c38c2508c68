"""The request side of a streaming generation engine (serve's transformers and vLLM engines).

A request is token-id prompt + :class:`StreamRequest` (a SamplingConfig and the stop strings); the
client reads its :class:`Generation` as an async stream of :class:`Delta` text pieces fed from the
engine's thread or tasks.
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


@dataclass
class Delta:
    """A piece of generated text; the last one of a request carries finish_reason and token counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


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
    """The client side of one request: an async stream of Deltas, fed from the engine's thread."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: StreamRequest, on_cancel) -> None:
        self.id = next(self._ids)
        self.prompt_ids = prompt_ids
        self.params = params
        self.arrived = time.perf_counter()
        self.cancelled = False
        self.finished = False
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._on_cancel = on_cancel

    def push(self, item: Delta | BaseException) -> None:
        """Thread-safe: hand a Delta (or the error that ended the request) to the client."""
        if isinstance(item, BaseException) or item.finish_reason:
            self.finished = True
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
        try:
            while True:
                item = await self._queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            self.cancel()


def context_length_of(config) -> int:
    """The longest sequence a model config allows (prompt + generated tokens); 2048 when it names none."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048
