"""The OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions (streamed as
server-sent events or not), /v1/score for reward models, /health and Prometheus /metrics.

Every refusal is an OpenAI-style JSON error ``{"error": {"message", "type", "param", "code"}}``
with a 4xx status, so the official clients raise their usual exceptions. The API key (when set) is
checked on every request, before the body is read.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from alignloop.config import SamplingConfig
from alignloop.generation.streaming import Delta, EngineStopped, Generation, QueueFull, StreamRequest
from alignloop.serve.metrics import ServeMetrics


@dataclass
class Limits:
    max_prompt_tokens: int = 4096
    max_tokens: int = 2048  # largest max_tokens a request may ask for
    default_max_tokens: int = 256
    max_body_bytes: int = 1_000_000
    max_score_pairs: int = 1024


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


# ---------------------------------------------------------------------------------------- requests


class _Body(BaseModel):
    # Fields the OpenAI clients send that change nothing here (user, logit_bias=None, ...) are ignored.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extension: keep generating past EOS (benchmarks need a fixed number of tokens).
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool = False


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class ScoreMessage(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ScorePair(_Body):
    # A plain prompt, or chat messages (the reward model then reads them through its chat template).
    prompt: str | list[ScoreMessage]
    response: str


class ScoreRequest(_Body):
    model: str | None = None
    pairs: list[ScorePair] = Field(min_length=1)


# ---------------------------------------------------------------------------------------- the app


class Server:
    """What the routes share: the engine (or the reward scorer), its tokenizer, limits, metrics."""

    def __init__(self, model_name: str, limits: Limits, metrics: ServeMetrics, engine=None, scorer=None,
                 api_key: str | None = None) -> None:
        self.model_name = model_name
        self.limits = limits
        self.metrics = metrics
        self.engine = engine
        self.scorer = scorer
        self.api_key = api_key
        self.created = int(time.time())
        self._score_lock = asyncio.Lock()

    # ---- prompt handling

    def check_request(self, req: _Sampling) -> None:
        if req.model != self.model_name:
            raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")
        if self.engine is None:
            raise APIError(400, f"'{self.model_name}' is a reward model: use /v1/score", param="model",
                           code="model_not_supported")
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        if req.presence_penalty or req.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported",
                           param="presence_penalty" if req.presence_penalty else "frequency_penalty")

    def sampling(self, req: _Sampling, prompt_len: int, max_tokens: int | None, param: str) -> StreamRequest:
        lim = self.limits
        if prompt_len > lim.max_prompt_tokens:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this server accepts at most "
                                f"{lim.max_prompt_tokens}", param=param, code="context_length_exceeded")
        if max_tokens is not None and max_tokens > lim.max_tokens:
            raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {lim.max_tokens}",
                           param="max_tokens", code="max_tokens_exceeded")
        room = self.engine.context_length - prompt_len
        if max_tokens is None:
            max_tokens = min(lim.default_max_tokens, room)
        if max_tokens > room or room < 1:
            raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                f"context of {self.engine.context_length} tokens", param="max_tokens",
                           code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise APIError(400, "stop takes up to 4 non-empty strings", param="stop")
        sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                  seed=req.seed, stop_on_eos=not req.ignore_eos)
        return StreamRequest(sampling, tuple(stop))

    def completion_prompt(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            vocab = len(self.engine.tokenizer)
            if any(t < 0 or t >= vocab for t in prompt):
                raise APIError(400, f"token ids must lie in [0, {vocab})", param="prompt")
            return list(prompt)
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "send one prompt per request", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        # Same tokenisation as SFT's prompt/completion records, so the model sees what it was trained on.
        return self.engine.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        from alignloop.data.tokenize import render_prompt

        messages = []
        for i, m in enumerate(req.messages):
            content = m.content
            if isinstance(content, list):  # content parts: only text is understood by a text model
                if any(part.get("type") != "text" for part in content):
                    raise APIError(400, "only text content parts are supported", param=f"messages.{i}.content")
                content = "".join(str(part.get("text", "")) for part in content)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        try:
            text = render_prompt(self.engine.tokenizer, messages)
        except Exception as exc:  # the model's own template may refuse a role order
            raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
        # The template already holds any BOS it wants (as in SFT's conversation records).
        return self.engine.tokenizer(text, add_special_tokens=False)["input_ids"]

    def submit(self, prompt_ids: list[int], params: StreamRequest) -> Generation:
        try:
            gen = self.engine.submit(prompt_ids, params)
        except QueueFull as exc:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(429, f"{exc}; retry later", type_="rate_limit_error", code="queue_full") from None
        except EngineStopped as exc:
            raise APIError(503, str(exc), type_="server_error", code="engine_stopped") from None
        return gen


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body was read already, so receive() only reports that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _watch(request: Request, gen: Generation) -> asyncio.Task:
    task = asyncio.create_task(_wait_disconnect(request))
    task.add_done_callback(lambda t: None if t.cancelled() else gen.cancel())
    return task


async def _collect(request: Request, gen: Generation) -> tuple[str, Delta]:
    watcher = _watch(request, gen)
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


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def _usage(last: Delta) -> dict:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


async def _stream(request: Request, gen: Generation, chunk, include_usage: bool,
                  first: dict | None = None) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text, the finish reason, optional usage, [DONE]."""
    watcher = _watch(request, gen)
    try:
        if first is not None:
            yield _sse(first)
        async for delta in gen.stream():
            if delta.text:
                yield _sse(chunk(delta.text, None))
            if delta.finish_reason:
                yield _sse(chunk("", delta.finish_reason))
                if include_usage:
                    yield _sse(chunk(None, None, usage=_usage(delta)))
        yield _sse("[DONE]")
    except Exception as exc:  # headers are out already: report in-band, as OpenAI does
        yield _sse(error_body(str(exc), "server_error"))
    finally:
        watcher.cancel()
        gen.cancel()


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if server.engine is not None:
            server.engine.start()
        try:
            yield
        finally:
            if server.engine is not None:
                server.engine.stop()

    app = FastAPI(title="alignloop", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid" or not loc:
            return error_response(400, "the request body must be a JSON object", code="invalid_json")
        param = ".".join(loc) or None
        message = f"{param}: {err['msg']}" if param else err["msg"]
        return error_response(400, message, param=param, code=err.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), code=str(exc.status_code))

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error")

    @app.get("/health")
    async def health():
        if server.engine is not None and not server.engine.is_alive():
            return error_response(503, "the generation engine has stopped", type_="server_error")
        return {"status": "ok", "model": server.model_name}

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "alignloop"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        server.check_request(req)
        ids = server.completion_prompt(req)
        params = server.sampling(req, len(ids), req.max_tokens, "prompt")
        gen = server.submit(ids, params)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = server.engine.tokenizer.decode(ids, skip_special_tokens=True) if req.echo else ""

        def chunk(text: str | None, finish: str | None, usage: dict | None = None) -> dict:
            choices = [] if text is None else [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]
            body = {"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                    "choices": choices}
            if usage:
                body["usage"] = usage
            return body

        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            first = chunk(echo, None) if echo else None
            return StreamingResponse(_stream(request, gen, chunk, include, first), media_type="text/event-stream")
        text, last = await _collect(request, gen)
        return chunk(echo + text, last.finish_reason, usage=_usage(last))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        server.check_request(req)
        ids = server.chat_prompt(req)
        params = server.sampling(req, len(ids), req.max_completion_tokens or req.max_tokens, "messages")
        gen = server.submit(ids, params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str | None, finish: str | None, usage: dict | None = None, role: bool = False) -> dict:
            delta: dict = {"role": "assistant", "content": ""} if role else {} if finish else {"content": text}
            choices = [] if text is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_name,
                    "choices": choices}
            if usage:
                body["usage"] = usage
            return body

        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(request, gen, chunk, include, chunk("", None, role=True)),
                                     media_type="text/event-stream")
        text, last = await _collect(request, gen)
        return {"id": rid, "object": "chat.completion", "created": created, "model": server.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": last.finish_reason, "logprobs": None}],
                "usage": _usage(last)}

    @app.post("/v1/score")
    async def score(req: ScoreRequest) -> dict:
        if server.scorer is None:
            raise APIError(400, f"'{server.model_name}' is not a reward model; /v1/score needs a reward-model "
                                "folder (alignloop.json stage 'rm')", code="model_not_supported")
        if req.model is not None and req.model != server.model_name:
            raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{server.model_name}'",
                           param="model", code="model_not_found")
        if len(req.pairs) > server.limits.max_score_pairs:
            raise APIError(400, f"{len(req.pairs)} pairs in one request; the limit is "
                                f"{server.limits.max_score_pairs}", param="pairs")
        prompts = [p.prompt if isinstance(p.prompt, str) else [m.model_dump() for m in p.prompt] for p in req.pairs]
        responses = [p.response for p in req.pairs]
        async with server._score_lock:  # one scoring batch at a time owns the model
            scores = await asyncio.to_thread(server.scorer, prompts, responses)
        server.metrics.scored_pairs.inc(len(scores))
        return {"object": "list", "model": server.model_name, "scores": [float(s) for s in scores]}

    return Guard(app, server)


class Guard:
    """ASGI middleware in front of every route: API key, body size, per-route metrics.

    It runs before FastAPI reads anything, so an unauthenticated or oversized request is refused
    without its body being parsed."""

    def __init__(self, app: FastAPI, server: Server) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        route = scope["path"] if scope["path"] in _ROUTES else "other"
        status = {"code": 500}

        async def send_tracking(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        refusal = self._refuse(scope)
        if refusal is None:
            body, refusal = await self._read_body(scope, receive)
            if body is None:  # the client left while sending its body
                return
        if refusal is not None:
            self.server.metrics.rejected.labels(refusal[1]).inc()
            await error_response(*refusal[0])(scope, receive, send_tracking)
        else:
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_tracking)
        self.server.metrics.requests.labels(route, str(status["code"])).inc()
        self.server.metrics.request_seconds.labels(route).observe(time.perf_counter() - start)

    def _refuse(self, scope) -> tuple[tuple, str] | None:
        key = self.server.api_key
        if not key:
            return None
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if hmac.compare_digest(given.encode(), key.encode()):
            return None
        message = "missing API key: send 'Authorization: Bearer KEY'" if not given else "incorrect API key"
        return (401, message, "invalid_request_error", None, "invalid_api_key"), "unauthenticated"

    async def _read_body(self, scope, receive) -> tuple[bytes | None, tuple | None]:
        limit = self.server.limits.max_body_bytes
        too_big = ((413, f"request body over {limit} bytes", "invalid_request_error", None, "body_too_large"),
                   "body_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return b"", too_big
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None, None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return b"", too_big
            if not message.get("more_body", False):
                return b"".join(chunks), None


_ROUTES = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/score"}


def build_server(model: str, engine: str = "transformers", api_key: str | None = None, limits: Limits | None = None,
                 max_batch: int = 32, max_queue: int = 256, served_model_name: str | None = None,
                 device: str = "auto", dtype: str = "auto") -> Server:
    """Load a model folder (a generator, or a reward model when its alignloop.json says stage 'rm')."""
    from pathlib import Path

    from alignloop.models.load import read_meta

    limits = limits or Limits()
    metrics = ServeMetrics()
    name = served_model_name or Path(model.rstrip("/")).name or model
    if read_meta(model).get("stage") == "rm":
        from alignloop.models.reward import RewardModel

        reward = RewardModel.load(model)

        def scorer(prompts: list[str], responses: list[str]) -> list[float]:
            return reward.score(prompts, responses, batch_size=32)

        return Server(name, limits, metrics, scorer=scorer, api_key=api_key)
    if engine == "vllm":
        from alignloop.generation.vllm import VLLMEngine

        gen_engine = VLLMEngine.create(model, metrics, max_batch=max_batch, max_queue=max_queue, dtype=dtype)
    else:
        gen_engine = _transformers_engine(model, metrics, max_batch, max_queue, device, dtype)
    if limits.max_prompt_tokens >= gen_engine.context_length:
        limits.max_prompt_tokens = gen_engine.context_length - 1
    return Server(name, limits, metrics, engine=gen_engine, api_key=api_key)


def _transformers_engine(model: str, metrics: ServeMetrics, max_batch: int, max_queue: int, device: str,
                         dtype: str):
    import torch

    from alignloop.config import ModelConfig
    from alignloop.data.tokenize import ensure_chat_template
    from alignloop.models.load import load_pretrained
    from alignloop.serve.engine import TransformersEngine

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    lm, tok = load_pretrained(ModelConfig(name_or_path=model, dtype=dtype), device=dev, for_training=False)
    if hasattr(lm, "merge_and_unload"):  # a LoRA run folder: fold the adapter in once, decode at full speed
        lm = lm.merge_and_unload()
    ensure_chat_template(tok)
    return TransformersEngine(lm.to(dev), tok, metrics, max_batch=max_batch, max_queue=max_queue)


@contextmanager
def serve_in_thread(app, host: str = "127.0.0.1") -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread on a free port; yields the base URL.

    The socket is bound before uvicorn starts, so there is no race for the port (tests, benchmarks)."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
