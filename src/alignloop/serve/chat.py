"""/v1/chat/completions: the assistant's next message after chat messages (through the model's chat
template), whole or streamed."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from alignloop.serve import streams
from alignloop.serve.deps import ServerDep
from alignloop.serve.prompts import chat_prompt
from alignloop.serve.sampling import generation_engine, stream_request
from alignloop.serve.schemas import (
    ERROR_RESPONSES,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Usage,
    event_stream,
)

router = APIRouter(tags=["chat"], responses=ERROR_RESPONSES)


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=event_stream(ChatCompletionChunk))
async def chat_completions(req: ChatCompletionRequest, request: Request,
                           server: ServerDep) -> ChatCompletion | StreamingResponse:
    engine = generation_engine(server, req)
    ids = chat_prompt(engine.tokenizer, req.messages)
    params = stream_request(req, len(ids), req.max_completion_tokens or req.max_tokens, server.limits,
                            engine.context_length, "messages")
    gen = streams.submit(engine, server.metrics, ids, params)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(text: str | None, finish: str | None, usage: Usage | None,
              delta: ChatDelta | None = None) -> ChatCompletionChunk:
        if delta is None:  # the finishing chunk's delta is empty, a text chunk's holds the text
            delta = ChatDelta() if finish else ChatDelta(content=text)
        choices = [] if text is None else [ChatChunkChoice(index=0, delta=delta, finish_reason=finish)]
        return ChatCompletionChunk(id=rid, created=created, model=server.model_name, choices=choices, usage=usage)

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        first = chunk("", None, None, delta=ChatDelta(role="assistant", content=""))
        return StreamingResponse(streams.event_stream(request, gen, chunk, include_usage, first),
                                 media_type="text/event-stream")
    text, last = await streams.collect(request, gen)
    return ChatCompletion(id=rid, created=created, model=server.model_name, usage=streams.usage(last),
                          choices=[ChatChoice(index=0, message=AssistantMessage(content=text),
                                              finish_reason=last.finish_reason)])
