"""From a completion or chat request to what the engine runs: the checks every generation request
passes (the served model, a generator rather than a reward model, only what the engine can honour),
the length limits, and the mapping onto the generation layer's SamplingConfig."""

from __future__ import annotations

from alignloop.config import SamplingConfig
from alignloop.generation.streaming import StreamRequest
from alignloop.serve.errors import APIError
from alignloop.serve.schemas import SamplingBody
from alignloop.serve.server import Limits, Server, StreamingEngine

MAX_STOP_STRINGS = 4


def generation_engine(server: Server, req: SamplingBody) -> StreamingEngine:
    """The engine that will answer ``req``, once the request is one it can honour: a field the engine
    cannot serve is refused, never silently dropped."""
    server.check_model(req.model)
    if server.engine is None:
        raise APIError(400, f"'{server.model_name}' is a reward model: use /v1/score", param="model",
                       code="model_not_supported")
    if req.n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    if req.presence_penalty or req.frequency_penalty:
        raise APIError(400, "presence_penalty and frequency_penalty are not supported",
                       param="presence_penalty" if req.presence_penalty else "frequency_penalty")
    return server.engine


def stream_request(req: SamplingBody, prompt_len: int, max_tokens: int | None, limits: Limits, context_length: int,
                   prompt_param: str) -> StreamRequest:
    """The request's sampling within the server's limits and the model's context. ``max_tokens`` is the
    request's bound (chat's ``max_completion_tokens`` wins over ``max_tokens``), None for the default;
    ``prompt_param`` names the prompt's field in a refusal."""
    if prompt_len > limits.max_prompt_tokens:
        raise APIError(400, f"the prompt has {prompt_len} tokens; this server accepts at most "
                            f"{limits.max_prompt_tokens}", param=prompt_param, code="context_length_exceeded")
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {limits.max_tokens}",
                       param="max_tokens", code="max_tokens_exceeded")
    room = context_length - prompt_len
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, room)
    if max_tokens > room or room < 1:
        raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                            f"context of {context_length} tokens", param="max_tokens",
                       code="context_length_exceeded")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
        raise APIError(400, f"stop takes up to {MAX_STOP_STRINGS} non-empty strings", param="stop")
    sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              seed=req.seed, stop_on_eos=not req.ignore_eos)
    return StreamRequest(sampling, tuple(stop))
