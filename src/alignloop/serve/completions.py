"""/v1/completions: text after a prompt (a string or token ids), whole or streamed."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from alignloop.serve import streams
from alignloop.serve.deps import ServerDep
from alignloop.serve.prompts import completion_prompt
from alignloop.serve.sampling import generation_engine, stream_request
from alignloop.serve.schemas import (
    ERROR_RESPONSES,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    Usage,
    event_stream,
)

router = APIRouter(tags=["completions"], responses=ERROR_RESPONSES)


@router.post("/v1/completions", response_model=Completion, responses=event_stream(CompletionChunk))
async def completions(req: CompletionRequest, request: Request, server: ServerDep) -> Completion | StreamingResponse:
    engine = generation_engine(server, req)
    ids = completion_prompt(engine.tokenizer, req.prompt)
    params = stream_request(req, len(ids), req.max_tokens, server.limits, engine.context_length, "prompt")
    gen = streams.submit(engine, server.metrics, ids, params)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echo = engine.tokenizer.decode(ids, skip_special_tokens=True) if req.echo else ""

    def chunk(text: str | None, finish: str | None, usage: Usage | None) -> CompletionChunk:
        choices = [] if text is None else [CompletionChoice(index=0, text=text, finish_reason=finish)]
        return CompletionChunk(id=rid, created=created, model=server.model_name, choices=choices, usage=usage)

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        first = chunk(echo, None, None) if echo else None
        return StreamingResponse(streams.event_stream(request, gen, chunk, include_usage, first),
                                 media_type="text/event-stream")
    text, last = await streams.collect(request, gen)
    return Completion(id=rid, created=created, model=server.model_name, usage=streams.usage(last),
                      choices=[CompletionChoice(index=0, text=echo + text, finish_reason=last.finish_reason)])
