"""The one place where the service layer's exceptions become HTTP answers.

``tasks.NotFound`` -> 404, ``tasks.Forbidden`` -> 403, ``tasks.Invalid`` and ``UserError`` -> 422,
``tasks.Conflict`` -> 409, ``auth.Unauthorized`` -> 401, all as ``{"detail": message}``; ``auth.Throttled`` -> 429
with ``Retry-After``. ``NotLoggedIn`` is 401 on the JSON API and a
redirect to the login page (coming back here afterwards) everywhere else.
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from alignloop.errors import UserError
from alignloop.feedback import auth, tasks
from alignloop.feedback.web.deps import API_PREFIX, NotLoggedIn

STATUS: dict[type[Exception], int] = {tasks.NotFound: 404, tasks.Forbidden: 403, tasks.Invalid: 422,
                                      tasks.Conflict: 409, UserError: 422, auth.Unauthorized: 401}


async def detail_response(_request: Request, exc: Exception) -> Response:
    status = next(code for kind, code in STATUS.items() if isinstance(exc, kind))
    return JSONResponse({"detail": str(exc)}, status)


async def throttled(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, auth.Throttled)
    return JSONResponse({"detail": str(exc)}, 429, headers={"Retry-After": str(exc.retry_after)})


async def not_logged_in(request: Request, exc: Exception) -> Response:
    if request.url.path.startswith(API_PREFIX + "/"):
        return JSONResponse({"detail": str(exc)}, 401, headers={"WWW-Authenticate": "Bearer"})
    return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)


def add_exception_handlers(app: FastAPI) -> None:
    for kind in STATUS:
        app.add_exception_handler(kind, detail_response)
    app.add_exception_handler(NotLoggedIn, not_logged_in)
    app.add_exception_handler(auth.Throttled, throttled)
