"""Who you are: logging in and out (API tokens and browser sessions), invite links, ``/api/me``."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from alignloop.errors import UserError
from alignloop.feedback import auth
from alignloop.feedback.db import User
from alignloop.feedback.web.deps import (
    API_PREFIX,
    DB,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    Address,
    Annotator,
    Credential,
    Now,
    checked_login_csrf,
    credential,
)
from alignloop.feedback.web.pages import render
from alignloop.feedback.web.schemas import (
    API_ERRORS,
    THROTTLED,
    AcceptBody,
    LoginBody,
    OkOut,
    TokenOut,
    UserOut,
)

api = APIRouter(prefix=API_PREFIX, tags=["login"], responses=API_ERRORS)
pages = APIRouter(tags=["login"], include_in_schema=False)


def user_out(user: User) -> UserOut:
    return UserOut(username=user.username, role=user.role)


# ---------------------------------------------------------------- JSON API


@api.post("/login", response_model=TokenOut, responses=THROTTLED)
def api_login(body: LoginBody, db: DB, address: Address, now: Now) -> TokenOut:
    user, token = auth.log_in(db, body.username, body.password, "api", address, now)
    return TokenOut(token=token, user=user_out(user))


@api.post("/logout", response_model=OkOut)
def api_logout(user: Annotator, presented: Annotated[Credential, Depends(credential)], db: DB) -> OkOut:
    auth.revoke(db, presented.secret)
    return OkOut(ok=True)


@api.get("/me", response_model=UserOut)
def api_me(user: Annotator) -> UserOut:
    return user_out(user)


@api.post("/invites/accept", response_model=TokenOut)
def api_accept_invite(body: AcceptBody, db: DB) -> TokenOut:
    invite = auth.open_invite(db, body.token)
    token = auth.accept_invite(db, invite, body.password, "api")
    return TokenOut(token=token, user=user_out(invite.user))


# ---------------------------------------------------------------- HTML


def local_path(url: str) -> str:
    """``url`` if it is a path on this site, else ``/``: an attacker-supplied next= must not send people
    to another site (``//host`` and ``/\\host`` both leave it in browsers)."""
    return url if url.startswith("/") and not url.startswith(("//", "/\\")) else "/"


def start_session(request: Request, secret: str, next_url: str) -> RedirectResponse:
    response = RedirectResponse(local_path(next_url), status_code=303)
    response.set_cookie(SESSION_COOKIE, secret, httponly=True, samesite="lax",
                        secure=request.app.state.secure_cookies,
                        max_age=int(auth.LIFETIMES["session"].total_seconds()))
    response.delete_cookie(LOGIN_CSRF_COOKIE)
    return response


@pages.get("/login", response_class=HTMLResponse)
def login_page(request: Request,
               next_url: Annotated[str, Query(alias="next", max_length=500)] = "/") -> Response:
    token = secrets.token_urlsafe(24)
    response = render(request, "login.html", None, next=next_url, login_csrf=token)
    response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict",
                        secure=request.app.state.secure_cookies)
    return response


@pages.post("/login")
def login_submit(request: Request, db: DB, address: Address, now: Now,
                 login_token: Annotated[str, Depends(checked_login_csrf)],
                 username: Annotated[str, Form(max_length=64)],
                 password: Annotated[str, Form(max_length=256)],
                 next_url: Annotated[str, Form(alias="next", max_length=500)] = "/") -> Response:
    try:
        _user, secret = auth.log_in(db, username, password, "session", address, now)
    except auth.Throttled as exc:
        response = render(request, "login.html", None, status=429, next=next_url, login_csrf=login_token,
                          error=f"Too many failed logins. Try again in {exc.retry_after} seconds.")
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except auth.Unauthorized:
        return render(request, "login.html", None, status=401, next=next_url, login_csrf=login_token,
                      error="Wrong username or password.")
    return start_session(request, secret, next_url)


@pages.post("/logout")
def logout(user: Annotator, presented: Annotated[Credential, Depends(credential)], db: DB) -> Response:
    auth.revoke(db, presented.secret)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response


@pages.get("/invite/{token}", response_class=HTMLResponse)
def invite_page(request: Request, token: str, db: DB) -> Response:
    invite = auth.lookup_token(db, token, "invite")
    if invite is None:
        return render(request, "message.html", None, title="Invite", status=404,
                      message="This invite link is invalid, used or expired. Ask an admin for a new one.")
    return render(request, "invite.html", None, token=token, invitee=invite.user)


@pages.post("/invite/{token}")
def invite_submit(request: Request, token: str, db: DB, password: Annotated[str, Form(max_length=256)],
                  password2: Annotated[str, Form(max_length=256)]) -> Response:
    invite = auth.open_invite(db, token)
    try:
        if password != password2:
            raise UserError("the two passwords differ")
        secret = auth.accept_invite(db, invite, password, "session")
    except UserError as exc:
        return render(request, "invite.html", None, status=400, token=token, invitee=invite.user,
                      error=str(exc))
    return start_session(request, secret, "/")
