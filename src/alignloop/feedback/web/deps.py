"""The app's dependencies, at module level: the database session, who is asking, the one role check, CSRF.

Who is asking: an ``Authorization: Bearer <token>`` header names an API token (scripts, simulated
annotators); without one, the session cookie names a browser session. A browser request that changes
something (any method but GET and HEAD) must also carry the CSRF token derived from its session, in the
``X-CSRF-Token`` header (the JSON API) or the ``csrf_token`` form field (the HTML forms): a cross-site page
cannot read it. Bearer requests need none, because browsers never attach them on their own.

Roles: every route that needs a login depends on ``require(role)`` (annotator < reviewer < admin), and
nothing else checks roles. Without valid credentials the caller gets ``NotLoggedIn``, which ``errors.py``
answers with 401 on the JSON API and with the login page elsewhere.
"""

from __future__ import annotations

import datetime as dt
import functools
import secrets
from collections.abc import Callable, Iterator
from typing import Annotated, NamedTuple

from fastapi import Depends, Form, HTTPException, Request
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from alignloop.feedback import auth
from alignloop.feedback.db import ROLES, User

API_PREFIX = "/api"
SESSION_COOKIE = "alignloop_session"
LOGIN_CSRF_COOKIE = "alignloop_login_csrf"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = ("GET", "HEAD")
FORM_CONTENT_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


class NotLoggedIn(Exception):
    """The request carries no valid session cookie or API token."""


def get_db(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as db:
        yield db


DB = Annotated[Session, Depends(get_db)]


def app_now(request: Request) -> dt.datetime:
    """The app's clock (naive UTC): ``create_app(clock=...)`` lets tests step over back-offs and leases."""
    return request.app.state.clock()


Now = Annotated[dt.datetime, Depends(app_now)]


def client_address(request: Request) -> str:
    """The caller's address (behind a reverse proxy on loopback, uvicorn takes it from X-Forwarded-For)."""
    return request.client.host if request.client is not None else "unknown"


Address = Annotated[str, Depends(client_address)]


# Declared as security schemes, so the OpenAPI schema says how to authenticate.
BEARER = HTTPBearer(auto_error=False, description="An API token from POST /api/login.")
SESSION = APIKeyCookie(name=SESSION_COOKIE, auto_error=False,
                       description="A browser session from the login page; a request that changes something "
                                   "also needs the X-CSRF-Token header.")


class Credential(NamedTuple):
    kind: str  # "api" (bearer token) or "session" (cookie)
    secret: str


def credential(bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
               session: Annotated[str | None, Depends(SESSION)]) -> Credential:
    """The secret this request authenticates with: its bearer token, else its session cookie."""
    if bearer is not None:
        return Credential("api", bearer.credentials)
    return Credential("session", session or "")


async def csrf_form_field(request: Request) -> str | None:
    """The ``csrf_token`` field of a form body (parsed once; the route reads the same parsed form)."""
    content_type = request.headers.get("content-type", "")
    if request.method in SAFE_METHODS or not content_type.startswith(FORM_CONTENT_TYPES):
        return None
    value = (await request.form()).get(CSRF_FIELD)
    return value if isinstance(value, str) else None


def current_user(request: Request, db: DB, presented: Annotated[Credential, Depends(credential)],
                 form_csrf: Annotated[str | None, Depends(csrf_form_field)]) -> User:
    token = auth.lookup_token(db, presented.secret, presented.kind)
    if presented.kind == "api":
        if token is None:
            raise NotLoggedIn("invalid or expired token")
        return token.user
    if token is None:
        raise NotLoggedIn("log in first")
    given = request.headers.get(CSRF_HEADER) or form_csrf
    if request.method not in SAFE_METHODS and not auth.check_csrf(presented.secret, given):
        raise HTTPException(403, "CSRF token missing or wrong")
    request.state.csrf = auth.csrf_for(presented.secret)  # for the forms of the page this request renders
    return token.user


@functools.cache
def require(minimum: str) -> Callable[..., User]:
    """Dependency: the logged-in caller, who must hold at least the ``minimum`` role. Cached per role, so a
    router-level ``require("admin")`` and a route's ``Admin`` parameter run the check once."""
    if minimum not in ROLES:
        raise ValueError(f"unknown role {minimum!r}")

    def caller_with_role(user: Annotated[User, Depends(current_user)]) -> User:
        if not auth.has_role(user, minimum):
            raise HTTPException(403, f"needs the {minimum} role")
        return user

    caller_with_role.__qualname__ = f"require({minimum!r})"
    return caller_with_role


# annotator is the lowest role: every logged-in user holds it.
Annotator = Annotated[User, Depends(require("annotator"))]
Reviewer = Annotated[User, Depends(require("reviewer"))]
Admin = Annotated[User, Depends(require("admin"))]


def checked_login_csrf(request: Request, login_csrf: Annotated[str, Form(max_length=100)] = "") -> str:
    """The login form's double-submit token: the form field must equal the cookie set with the form
    (there is no session yet to derive a token from). Returns the token."""
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not cookie or not secrets.compare_digest(cookie.encode(), login_csrf.encode()):
        raise HTTPException(403, "CSRF token missing or wrong; reload the login page")
    return cookie
