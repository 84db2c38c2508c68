"""The ASGI guard in front of every route: API key, body size, per-route metrics.

It runs before FastAPI reads anything, so an unauthenticated or oversized request is refused without
its body being parsed (or, without the key, its path even being looked up)."""

from __future__ import annotations

import hmac
import time
from collections.abc import Collection
from typing import NamedTuple

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from alignloop.serve.errors import error_response
from alignloop.serve.server import Server


class Refusal(NamedTuple):
    status: int
    message: str
    code: str
    reason: str  # the label of alignloop_rejected_requests


def api_key_refusal(scope: Scope, key: str | None) -> Refusal | None:
    """None when the server is open or the request carries ``Authorization: Bearer <key>``."""
    if not key:
        return None
    auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    if hmac.compare_digest(given.encode(), key.encode()):
        return None
    message = "missing API key: send 'Authorization: Bearer KEY'" if not given else "incorrect API key"
    return Refusal(401, message, "invalid_api_key", "unauthenticated")


class Guard:
    """``routes``: the paths counted under their own label in the request metrics (others: "other")."""

    def __init__(self, app: ASGIApp, server: Server, routes: Collection[str]) -> None:
        self.app = app
        self.server = server
        self.routes = frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = {"code": 500}

        async def send_tracking(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        refusal = api_key_refusal(scope, self.server.api_key)
        if refusal is None:
            body, refusal = await self.read_body(scope, receive)
            if body is None:  # the client left while sending its body
                return
        if refusal is not None:
            self.server.metrics.rejected.labels(refusal.reason).inc()
            answer = error_response(refusal.status, refusal.message, code=refusal.code)
            await answer(scope, receive, send_tracking)
        else:
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send_tracking)
        self.server.metrics.requests.labels(route, str(status["code"])).inc()
        self.server.metrics.request_seconds.labels(route).observe(time.perf_counter() - start)

    async def read_body(self, scope: Scope, receive: Receive) -> tuple[bytes | None, Refusal | None]:
        """The whole body, or a refusal once it passes ``max_body_bytes``; no body when the client left."""
        limit = self.server.limits.max_body_bytes
        too_big = Refusal(413, f"request body over {limit} bytes", "body_too_large", "body_too_large")
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
