"""Running a request's generations on the engine (one per prompt, each with its n choices) and
answering with them: every choice whole at once, or server-sent events as the choices stream. Either
way a client that goes away cancels its generations, which frees their engine slots at once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

from fastapi import Request
from pydantic import BaseModel

from alignloop.generation.streaming import (
    Delta,
    EngineStopped,
    Generation,
    QueueFull,
    StreamRequest,
    TokenLogprob,
)
from alignloop.serve.errors import APIError, error_body
from alignloop.serve.metrics import ServeMetrics
from alignloop.serve.schemas import Usage
from alignloop.serve.server import StreamingEngine

# The events one Delta of the generation of prompt p becomes: (p, delta) -> chunks.
ChunkEvents = Callable[[int, Delta], Iterable[BaseModel]]


def submit(engine: StreamingEngine, metrics: ServeMetrics,
           requests: list[tuple[list[int], StreamRequest]]) -> list[Generation]:
    """One generation per (prompt ids, params); all are queued or none (a refusal cancels the rest)."""
    gens: list[Generation] = []
    try:
        for prompt_ids, params in requests:
            gens.append(engine.submit(prompt_ids, params))
    except QueueFull as exc:
        metrics.rejected.labels("queue_full").inc()
        raise APIError(429, f"{exc}; retry later", type_="rate_limit_error", code="queue_full") from None
    except EngineStopped as exc:
        raise APIError(503, str(exc), type_="server_error", code="engine_stopped") from None
    finally:
        if len(gens) < len(requests):
            for gen in gens:
                gen.cancel()
    return gens


@dataclass
class ChoiceResult:
    """One choice, collected: its text, its tokens' log-probs, the prompt's log-probs (when asked for)."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.logprobs.extend(delta.logprobs)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.finish_reason:
            self.finish_reason, self.completion_tokens = delta.finish_reason, delta.completion_tokens


def usage(gens: list[Generation], completion_tokens: int) -> Usage:
    """OpenAI's count: each prompt once (whatever n), every choice's generated tokens."""
    prompt_tokens = sum(len(g.prompt_ids) for g in gens)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


async def wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body was read already, so receive() only reports that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def cancel_on_disconnect(request: Request, gens: list[Generation]) -> asyncio.Task:
    def cancel_all(task: asyncio.Task) -> None:
        if not task.cancelled():
            for gen in gens:
                gen.cancel()

    task = asyncio.create_task(wait_disconnect(request))
    task.add_done_callback(cancel_all)
    return task


async def merged(gens: list[Generation]) -> AsyncIterator[tuple[int, Delta]]:
    """The Deltas of all generations as they come, each with its generation's position."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(p: int, gen: Generation) -> None:
        try:
            async for delta in gen.stream():
                queue.put_nowait((p, delta))
        except Exception as exc:
            queue.put_nowait((p, exc))
        finally:
            queue.put_nowait((p, None))

    pumps = [asyncio.create_task(pump(p, gen)) for p, gen in enumerate(gens)]
    try:
        ended = 0
        while ended < len(gens):
            p, item = await queue.get()
            if item is None:
                ended += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield p, item
    finally:
        for task in pumps:
            task.cancel()
        for gen in gens:
            gen.cancel()


async def collect(request: Request, gens: list[Generation]) -> list[list[ChoiceResult]]:
    """Every choice of every generation, whole: ``result[p][j]`` is prompt p's choice j."""
    watcher = cancel_on_disconnect(request, gens)
    results = [[ChoiceResult() for _ in range(gen.params.n)] for gen in gens]
    try:
        async for p, delta in merged(gens):
            results[p][delta.index].add(delta)
    finally:
        watcher.cancel()
    if any(choice.finish_reason is None for choices in results for choice in choices):
        raise APIError(499, "client closed the request", code="client_closed")
    return results


def sse(event: BaseModel | dict | str) -> str:
    data = event if isinstance(event, str) else json.dumps(
        event.model_dump(mode="json") if isinstance(event, BaseModel) else event)
    return f"data: {data}\n\n"


async def event_stream(request: Request, gens: list[Generation], events: ChunkEvents,
                       first: Iterable[BaseModel] = (),
                       usage_chunk: Callable[[Usage], BaseModel] | None = None) -> AsyncIterator[str]:
    """Server-sent events: ``first``, the chunks of every Delta as the choices stream (``events``),
    the usage chunk once every choice has finished (when ``usage_chunk`` is given), then [DONE]."""
    watcher = cancel_on_disconnect(request, gens)
    completion_tokens = 0
    try:
        for event in first:
            yield sse(event)
        async for p, delta in merged(gens):
            completion_tokens += delta.completion_tokens
            for event in events(p, delta):
                yield sse(event)
        if usage_chunk is not None and all(gen.finished for gen in gens):
            yield sse(usage_chunk(usage(gens, completion_tokens)))
        yield sse("[DONE]")
    except Exception as exc:  # headers are out already: report in-band, as OpenAI does
        yield sse(error_body(str(exc), "server_error"))
    finally:
        watcher.cancel()
        for gen in gens:
            gen.cancel()
