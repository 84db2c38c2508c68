"""What the routes share (:class:`Server`: the engine or the reward scorer, limits, metrics, API key)
and :func:`serve_in_thread`, which runs an app on a free port (tests, benchmarks).

A Server holds ready objects; ``backends.build_server`` loads them from a model folder.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import uvicorn

from alignloop.generation.streaming import Generation, StreamRequest
from alignloop.serve.errors import APIError
from alignloop.serve.metrics import ServeMetrics


@dataclass
class Limits:
    """What one request may ask for; a request beyond a limit is refused with a 400 naming the field."""

    max_prompt_tokens: int = 4096  # one prompt
    max_total_prompt_tokens: int = 65536  # all prompts of one request together
    max_tokens: int = 2048  # largest max_tokens a request may ask for
    default_max_tokens: int = 256
    max_n: int = 16  # choices per prompt
    max_choices: int = 128  # choices per request: prompts x n
    max_top_logprobs: int = 20  # completions' logprobs, chat's top_logprobs (OpenAI's maximum is 20)
    max_body_bytes: int = 1_000_000
    max_score_pairs: int = 1024


class StreamingEngine(Protocol):
    """A generation engine the server drives (serve.engine's TransformersEngine, generation.vllm's
    VLLMEngine): token-id prompts in, streamed Generations out."""

    tokenizer: Any
    context_length: int  # prompt + generated tokens

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def is_alive(self) -> bool: ...

    def submit(self, prompt_ids: list[int], params: StreamRequest) -> Generation: ...


# (prompts, responses) -> one reward per pair; a prompt is a string or a list of chat messages.
Scorer = Callable[[list[Any], list[str]], list[float]]


@dataclass
class Server:
    """A generator server has an engine, a reward-model server a scorer (and no engine)."""

    model_name: str
    limits: Limits
    metrics: ServeMetrics
    engine: StreamingEngine | None = None
    scorer: Scorer | None = None
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    # One scoring batch at a time owns the reward model.
    score_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def check_model(self, model: str) -> None:
        """A request must name the model this server serves."""
        if model != self.model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")


@contextmanager
def serve_in_thread(app, host: str = "127.0.0.1") -> Iterator[str]:
    """Run ``app`` under uvicorn in a background thread on a free port; yields the base URL.

    The socket is bound before uvicorn starts, so there is no race for the port (tests, benchmarks)."""
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
