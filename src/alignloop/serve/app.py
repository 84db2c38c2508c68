"""The OpenAI-compatible HTTP app: /v1/models, /v1/completions, /v1/chat/completions (streamed as
server-sent events or not), /v1/score for reward models, /health and Prometheus /metrics.

Every refusal is an OpenAI-style JSON error ``{"error": {"message", "type", "param", "code"}}`` with a
4xx status, so the official clients raise their usual exceptions (``errors.py``). The API key (when
set) is checked on every request, before the body is read (``middleware.Guard``). The app takes a
ready :class:`Server`; ``backends.build_server`` loads one from a model folder.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Security

from alignloop.serve import chat, completions, health, models, score
from alignloop.serve.deps import API_KEY
from alignloop.serve.errors import add_exception_handlers
from alignloop.serve.middleware import Guard
from alignloop.serve.server import Server

AREAS = (health, models, completions, chat, score)


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if server.engine is not None:
            server.engine.start()
        try:
            yield
        finally:
            if server.engine is not None:
                server.engine.stop()

    app = FastAPI(title="alignloop", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.server = server
    add_exception_handlers(app)
    # The key is checked by the Guard; declaring the scheme on the routes puts it in the OpenAPI schema.
    auth = [Security(API_KEY)] if server.api_key else []
    for area in AREAS:
        app.include_router(area.router, dependencies=auth)
    paths = {route.path for area in AREAS for route in area.router.routes}
    app.add_middleware(Guard, server=server, routes=paths)
    return app
