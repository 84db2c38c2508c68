"""From a completion or chat request to what the engine runs: the checks every generation request
passes (the served model, a generator rather than a reward model, only what the engine can honour),
the length and size limits, and the mapping onto the generation layer's StreamRequest.

Every field of a request body is either honoured or refused here with a 400 naming it (code
``unsupported_parameter`` for a value this server cannot honour): nothing is accepted and dropped.
"""

from __future__ import annotations

from alignloop.config import SamplingConfig
from alignloop.generation.streaming import StreamRequest
from alignloop.serve.errors import APIError
from alignloop.serve.schemas import ChatCompletionRequest, CompletionRequest, SamplingBody
from alignloop.serve.server import Limits, Server, StreamingEngine

# More than OpenAI's 4: lm-eval's code tasks (humaneval) send five `until` strings and add the EOS text;
# vLLM has no limit. Each string costs one search of the text's tail per generated token.
MAX_STOP_STRINGS = 16


def unsupported(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="unsupported_parameter")


def generation_engine(server: Server, req: SamplingBody) -> StreamingEngine:
    """The engine that will answer ``req``: the request names the served model and it is a generator."""
    server.check_model(req.model)
    if server.engine is None:
        raise APIError(400, f"'{server.model_name}' is a reward model: use /v1/score", param="model",
                       code="model_not_supported")
    return server.engine


def check_sampling(req: SamplingBody, limits: Limits) -> None:
    """The fields both routes share."""
    if req.n > limits.max_n:
        raise APIError(400, f"n={req.n} is above this server's limit of {limits.max_n}", param="n",
                       code="n_exceeded")
    for param in ("presence_penalty", "frequency_penalty"):
        if getattr(req, param):
            raise unsupported(param, "penalties are not supported (only 0)")
    if req.logit_bias:
        raise unsupported("logit_bias", "logit bias is not supported")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options: only allowed with stream: true", param="stream_options")


def check_top_logprobs(k: int | None, param: str, limits: Limits) -> None:
    if k is not None and k > limits.max_top_logprobs:
        raise APIError(400, f"{param}={k} is above this server's limit of {limits.max_top_logprobs}", param=param,
                       code="logprobs_exceeded")


def check_completion_request(req: CompletionRequest, limits: Limits) -> None:
    check_sampling(req, limits)
    if req.best_of is not None and req.best_of != req.n:
        raise unsupported("best_of", "only best_of = n is supported (no server-side ranking of choices)")
    if req.suffix:
        raise unsupported("suffix", "insertion after a suffix is not supported")
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens: 0 only with echo: true (score the prompt)", param="max_tokens")
    check_top_logprobs(req.logprobs, "logprobs", limits)


def check_chat_request(req: ChatCompletionRequest, limits: Limits) -> None:
    check_sampling(req, limits)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
    check_top_logprobs(req.top_logprobs, "top_logprobs", limits)
    if req.response_format is not None and req.response_format != {"type": "text"}:
        raise unsupported("response_format", 'only {"type": "text"} is supported')
    for param in ("tools", "tool_choice", "parallel_tool_calls"):
        if getattr(req, param) not in (None, []):
            raise unsupported(param, "tool calling is not supported")


def check_request_size(prompt_lengths: list[int], n: int, limits: Limits) -> None:
    """All prompts of a request together, and its choices (prompts x n), within the server's limits."""
    total = sum(prompt_lengths)
    if total > limits.max_total_prompt_tokens:
        raise APIError(400, f"the prompts have {total} tokens together; this server accepts at most "
                            f"{limits.max_total_prompt_tokens} per request", param="prompt",
                       code="context_length_exceeded")
    choices = len(prompt_lengths) * n
    if choices > limits.max_choices:
        raise APIError(400, f"{len(prompt_lengths)} prompts x n={n} = {choices} choices; this server answers at "
                            f"most {limits.max_choices} per request", param="n" if len(prompt_lengths) == 1 else
                       "prompt", code="n_exceeded")


def stream_request(req: SamplingBody, prompt_len: int, max_tokens: int | None, limits: Limits, context_length: int,
                   prompt_param: str, logprobs: int | None = None,
                   prompt_logprobs: int | None = None) -> StreamRequest:
    """One prompt's sampling within the server's limits and the model's context. ``max_tokens`` is the
    request's bound (chat's ``max_completion_tokens`` wins over ``max_tokens``), None for the default,
    0 to score the prompt only; ``prompt_param`` names the prompt's field in a refusal. ``logprobs`` /
    ``prompt_logprobs``: how many most likely tokens to report per generated / prompt token (None: no
    log-probs)."""
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
    # A prompt-only request samples nothing; its SamplingConfig still needs a valid length.
    sampling = SamplingConfig(max_new_tokens=max(max_tokens, 1), temperature=req.temperature, top_p=req.top_p,
                              seed=req.seed, stop_on_eos=not req.ignore_eos)
    return StreamRequest(sampling, tuple(stop), n=req.n, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                         prompt_only=max_tokens == 0)
