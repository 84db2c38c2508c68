"""Running a request on the engine and answering with it: the whole text at once, or server-sent events
as the text streams. Either way a client that goes away cancels its generation, which frees the
engine slot at once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from pydantic import BaseModel

from alignloop.generation.streaming import Delta, EngineStopped, Generation, QueueFull, StreamRequest
from alignloop.serve.errors import APIError, error_body
from alignloop.serve.metrics import ServeMetrics
from alignloop.serve.schemas import Usage
from alignloop.serve.server import StreamingEngine

# Builds one streamed chunk: (text, finish_reason, usage). Text None makes the usage chunk (no choices).
ChunkBuilder = Callable[[str | None, str | None, Usage | None], BaseModel]


def submit(engine: StreamingEngine, metrics: ServeMetrics, prompt_ids: list[int], params: StreamRequest) -> Generation:
    try:
        return engine.submit(prompt_ids, params)
    except QueueFull as exc:
        metrics.rejected.labels("queue_full").inc()
        raise APIError(429, f"{exc}; retry later", type_="rate_limit_error", code="queue_full") from None
    except EngineStopped as exc:
        raise APIError(503, str(exc), type_="server_error", code="engine_stopped") from None


def usage(last: Delta) -> Usage:
    return Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                 total_tokens=last.prompt_tokens + last.completion_tokens)


async def wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body was read already, so receive() only reports that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def cancel_on_disconnect(request: Request, gen: Generation) -> asyncio.Task:
    task = asyncio.create_task(wait_disconnect(request))
    task.add_done_callback(lambda t: None if t.cancelled() else gen.cancel())
    return task


async def collect(request: Request, gen: Generation) -> tuple[str, Delta]:
    """The whole generated text and the last Delta (finish reason, token counts)."""
    watcher = cancel_on_disconnect(request, gen)
    text, last = [], Delta("")
    try:
        async for delta in gen.stream():
            text.append(delta.text)
            last = delta
    finally:
        watcher.cancel()
    if last.finish_reason is None:
        raise APIError(499, "client closed the request", code="client_closed")
    return "".join(text), last


def sse(event: BaseModel | dict | str) -> str:
    data = event if isinstance(event, str) else json.dumps(
        event.model_dump(mode="json") if isinstance(event, BaseModel) else event)
    return f"data: {data}\n\n"


async def event_stream(request: Request, gen: Generation, chunk: ChunkBuilder, include_usage: bool,
                       first: BaseModel | None = None) -> AsyncIterator[str]:
    """Server-sent events: ``first`` (if any), one chunk per piece of text, the finish reason, the
    usage when asked for, then [DONE]."""
    watcher = cancel_on_disconnect(request, gen)
    try:
        if first is not None:
            yield sse(first)
        async for delta in gen.stream():
            if delta.text:
                yield sse(chunk(delta.text, None, None))
            if delta.finish_reason:
                yield sse(chunk("", delta.finish_reason, None))
                if include_usage:
                    yield sse(chunk(None, None, usage(delta)))
        yield sse("[DONE]")
    except Exception as exc:  # headers are out already: report in-band, as OpenAI does
        yield sse(error_body(str(exc), "server_error"))
    finally:
        watcher.cancel()
        gen.cancel()
