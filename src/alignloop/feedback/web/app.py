"""The labelling web app: a JSON API under ``/api`` and server-rendered HTML pages, one FastAPI app.

Authentication: every route needs a logged-in user except logging in, accepting an invite, the
static script and ``/health`` (for load balancers: answers once the database does). Browsers hold a session cookie (HttpOnly, SameSite=Lax; Secure with ``secure_cookies``)
and every form carries a CSRF token; API clients (scripts, simulated annotators) send ``Authorization:
Bearer <token>`` from ``POST /api/login``. Roles are checked on the server for every route, by
``deps.require``: annotator < reviewer < admin (a reviewer can also label; an admin can do everything).

Untrusted text (prompts, model outputs, comments, names) is only ever rendered through Jinja2's
autoescaping, and the Content-Security-Policy allows no inline script, so a response holding
``<script>`` shows as text and runs nothing. The OpenAPI schema is not served (``app.openapi()`` builds
it); it describes the JSON API only.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from alignloop.feedback.db import open_db, utcnow
from alignloop.feedback.web import admin, compare, labelling, login, pages, review
from alignloop.feedback.web.deps import DB
from alignloop.feedback.web.errors import add_exception_handlers
from alignloop.feedback.web.middleware import MAX_BODY_BYTES, BodyLimit, SecurityHeaders
from alignloop.feedback.web.schemas import UNAVAILABLE, HealthOut

AREAS = (login, labelling, review, compare, admin)


def create_app(db_url: str, sessions: sessionmaker | None = None, secure_cookies: bool = False,
               clock: Callable[[], dt.datetime] = utcnow) -> FastAPI:
    """``clock`` (naive UTC) times login back-offs and task leases."""
    app = FastAPI(title="alignloop feedback", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sessions = sessions or open_db(db_url)
    app.state.clock = clock
    app.state.secure_cookies = secure_cookies
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.add_middleware(SecurityHeaders)  # added last, so outermost: also on BodyLimit's 413
    add_exception_handlers(app)
    for area in AREAS:
        app.include_router(area.api)
        app.include_router(area.pages)
    app.include_router(pages.router)

    @app.get("/health", response_model=HealthOut, tags=["health"], responses=UNAVAILABLE)
    def health(db: DB) -> Any:
        try:
            db.execute(text("SELECT 1"))
        except SQLAlchemyError:
            return JSONResponse({"detail": "the database does not answer"}, 503)
        return HealthOut(status="ok")

    return app
