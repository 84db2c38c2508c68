"""/v1/completions: text after one or several prompts (strings or token ids), n choices each, whole or
streamed, with log-probs in the legacy format; ``echo`` puts the prompt (and, with ``logprobs``, its
tokens' log-probs) in front, and ``max_tokens: 0`` with ``echo`` scores the prompt alone."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from alignloop.generation.streaming import Delta
from alignloop.serve import streams
from alignloop.serve.deps import ServerDep
from alignloop.serve.logprobs import ChoiceLogprobs, Item, TokenTexts, generated_items, prompt_items
from alignloop.serve.prompts import completion_prompts
from alignloop.serve.sampling import (
    check_completion_request,
    check_request_size,
    generation_engine,
    stream_request,
)
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
    check_completion_request(req, server.limits)
    prompts = completion_prompts(engine.tokenizer, req.prompt)
    check_request_size([len(ids) for ids in prompts], req.n, server.limits)
    k = req.logprobs
    jobs = [(ids, stream_request(req, len(ids), req.max_tokens, server.limits, engine.context_length, "prompt",
                                 logprobs=k, prompt_logprobs=k if req.echo else None)) for ids in prompts]
    gens = streams.submit(engine, server.metrics, jobs)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echoes = [engine.tokenizer.decode(ids, skip_special_tokens=True) if req.echo else "" for ids in prompts]
    texts = TokenTexts(engine.tokenizer)
    # One formatter per choice (index = prompt index * n + j), following its tokens from the prompt on.
    formatters = [ChoiceLogprobs(texts, () if req.echo else ids) for ids in prompts for _ in range(req.n)]

    def logprobs_of(index: int, items: list[Item]):
        return None if k is None else formatters[index].legacy(items)

    if req.stream:
        started: set[int] = set()

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionChunk:
            return CompletionChunk(id=rid, created=created, model=server.model_name, choices=choices, usage=usage)

        def events(p: int, delta: Delta) -> list[CompletionChunk]:
            index = p * req.n + delta.index
            text, items = delta.text, generated_items(delta.logprobs)
            if index not in started:  # a choice's first chunk carries the echoed prompt
                started.add(index)
                text = echoes[p] + text
                if req.echo and delta.prompt_logprobs is not None:
                    items = prompt_items(prompts[p], delta.prompt_logprobs) + items
            out = []
            if text or items:
                out.append(chunk([CompletionChoice(index=index, text=text, finish_reason=None,
                                                   logprobs=logprobs_of(index, items))]))
            if delta.finish_reason:
                out.append(chunk([CompletionChoice(index=index, text="", finish_reason=delta.finish_reason)]))
            return out

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(streams.event_stream(request, gens, events,
                                                      usage_chunk=(lambda u: chunk([], u)) if include_usage else None),
                                 media_type="text/event-stream")
    results = await streams.collect(request, gens)
    choices = []
    for p, per_prompt in enumerate(results):
        for j, choice in enumerate(per_prompt):
            index = p * req.n + j
            items = generated_items(choice.logprobs)
            if req.echo and choice.prompt_logprobs is not None:
                items = prompt_items(prompts[p], choice.prompt_logprobs) + items
            choices.append(CompletionChoice(index=index, text=echoes[p] + choice.text,
                                            finish_reason=choice.finish_reason, logprobs=logprobs_of(index, items)))
    completion_tokens = sum(c.completion_tokens for per_prompt in results for c in per_prompt)
    return Completion(id=rid, created=created, model=server.model_name, choices=choices,
                      usage=streams.usage(gens, completion_tokens))
