"""/v1/chat/completions: the assistant's next message after chat messages (through the model's chat
template), n choices, whole or streamed, with log-probs in the chat format."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from alignloop.generation.streaming import Delta, TokenLogprob
from alignloop.serve import streams
from alignloop.serve.deps import ServerDep
from alignloop.serve.logprobs import ChoiceLogprobs, TokenTexts
from alignloop.serve.prompts import chat_prompt
from alignloop.serve.sampling import check_chat_request, check_request_size, generation_engine, stream_request
from alignloop.serve.schemas import (
    ERROR_RESPONSES,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    Usage,
    event_stream,
)

router = APIRouter(tags=["chat"], responses=ERROR_RESPONSES)


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses=event_stream(ChatCompletionChunk))
async def chat_completions(req: ChatCompletionRequest, request: Request,
                           server: ServerDep) -> ChatCompletion | StreamingResponse:
    engine = generation_engine(server, req)
    check_chat_request(req, server.limits)
    ids = chat_prompt(engine.tokenizer, req.messages)
    check_request_size([len(ids)], req.n, server.limits)
    params = stream_request(req, len(ids), req.max_completion_tokens or req.max_tokens, server.limits,
                            engine.context_length, "messages",
                            logprobs=(req.top_logprobs or 0) if req.logprobs else None)
    gens = streams.submit(engine, server.metrics, [(ids, params)])
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    texts = TokenTexts(engine.tokenizer)
    formatters = [ChoiceLogprobs(texts, ids) for _ in range(req.n)]

    def logprobs_of(index: int, entries: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> ChatLogprobs | None:
        return ChatLogprobs(content=formatters[index].chat(entries)) if req.logprobs else None

    if req.stream:
        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=created, model=server.model_name, choices=choices,
                                       usage=usage)

        def events(_: int, delta: Delta) -> list[ChatCompletionChunk]:
            out = []
            if delta.text or delta.logprobs:
                out.append(chunk([ChatChunkChoice(index=delta.index, delta=ChatDelta(content=delta.text),
                                                  finish_reason=None, logprobs=logprobs_of(delta.index,
                                                                                           delta.logprobs))]))
            if delta.finish_reason:  # the finishing chunk's delta is empty
                out.append(chunk([ChatChunkChoice(index=delta.index, delta=ChatDelta(),
                                                  finish_reason=delta.finish_reason)]))
            return out

        # Each choice opens with a chunk naming the role, as OpenAI's do.
        first = [chunk([ChatChunkChoice(index=j, delta=ChatDelta(role="assistant", content=""), finish_reason=None)])
                 for j in range(req.n)]
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(streams.event_stream(request, gens, events, first,
                                                      usage_chunk=(lambda u: chunk([], u)) if include_usage else None),
                                 media_type="text/event-stream")
    [results] = await streams.collect(request, gens)
    choices = [ChatChoice(index=j, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason,
                          logprobs=logprobs_of(j, c.logprobs)) for j, c in enumerate(results)]
    return ChatCompletion(id=rid, created=created, model=server.model_name, choices=choices,
                          usage=streams.usage(gens, sum(c.completion_tokens for c in results)))
