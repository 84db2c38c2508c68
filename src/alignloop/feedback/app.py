"""The labelling web app: a JSON API under ``/api`` and server-rendered HTML pages, one FastAPI app.

Authentication: every route needs a logged-in user except logging in, accepting an invite and the
static script. Browsers hold a session cookie (HttpOnly, SameSite=Lax) and every form carries a CSRF
token; API clients (scripts, simulated annotators) send ``Authorization: Bearer <token>`` from
``POST /api/login``. Roles are checked on the server for every route: annotator < reviewer < admin
(a reviewer can also label; an admin can do everything).

Untrusted text (prompts, model outputs, comments, names) is only ever rendered through Jinja2's
autoescaping, and the Content-Security-Policy allows no inline script, so a response holding
``<script>`` shows as text and runs nothing.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from alignloop.errors import UserError
from alignloop.feedback import agreement, auth, charts, tasks
from alignloop.feedback.db import (
    DEFAULT_CRITERIA,
    ROLES,
    Assignment,
    Candidate,
    Comparison,
    Round,
    User,
    open_db,
)
from alignloop.feedback.export import FORMATS, export_records, to_jsonl

HERE = Path(__file__).parent
SESSION_COOKIE = "alignloop_session"
LOGIN_CSRF_COOKIE = "alignloop_login_csrf"
MAX_BODY_BYTES = 8 * 1024 * 1024
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes (declared or streamed) with 413."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await PlainTextResponse("request body too large", 413)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, "request body too large")
            return message

        return await self.app(scope, limited, send)


class LoginRequired(Exception):
    pass


# ---------------------------------------------------------------- request bodies (sizes bounded)


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginBody(Body):
    username: str = Field(max_length=64)
    password: str = Field(max_length=256)


class RoundBody(Body):
    name: str = Field(min_length=1, max_length=100)
    criteria: list[dict[str, Any]] = Field(default_factory=lambda: [dict(c) for c in DEFAULT_CRITERIA],
                                           max_length=tasks.MAX_CRITERIA)
    guidelines: str = Field("", max_length=20_000)
    overlap: int = Field(1, ge=1, le=50)


class ItemsBody(Body):
    items: list[dict[str, Any]] = Field(max_length=10_000)
    kind: Literal["candidate", "policy"] = "candidate"


class FlagBody(Body):
    candidate_id: int
    kind: str = Field(max_length=16)


class LabelBody(Body):
    ranking: list[int] = Field(default_factory=list, max_length=16)
    ratings: dict[int, dict[str, float]] = Field(default_factory=dict, max_length=16)
    flags: list[FlagBody] = Field(default_factory=list, max_length=64)
    comment: str = Field("", max_length=tasks.MAX_COMMENT_CHARS)
    skip: bool = False


class ReviewBody(Body):
    decision: Literal["approve", "flag"]
    reason: str = Field("", max_length=tasks.MAX_COMMENT_CHARS)


class CompareBody(Body):
    model_a: str = Field(max_length=255)
    model_b: str = Field(max_length=255)


class VoteBody(Body):
    winner: Literal["left", "right", "tie"]


class InviteBody(Body):
    username: str = Field(max_length=64)
    role: Literal["annotator", "reviewer", "admin"] = "annotator"


class AcceptBody(Body):
    token: str = Field(max_length=200)
    password: str = Field(max_length=256)


# ---------------------------------------------------------------- the app


def create_app(db_url: str, sessions: sessionmaker | None = None, secure_cookies: bool = False) -> FastAPI:
    Sessions = sessions or open_db(db_url)
    app = FastAPI(title="alignloop feedback", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals["roles"] = ROLES

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        # Invite links carry a secret in the URL: never leak it to another site.
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    def get_db() -> Iterator[Session]:
        with Sessions() as db:
            yield db

    # ------------------------------------------------------------ who is asking

    def _cookie_user(request: Request, db: Session) -> tuple[User, str] | None:
        secret = request.cookies.get(SESSION_COOKIE)
        tok = auth.lookup_token(db, secret, "session")
        return (tok.user, secret) if tok is not None else None

    def api_user(request: Request, db: Session = Depends(get_db)) -> User:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            tok = auth.lookup_token(db, header[7:].strip(), "api")
            if tok is None:
                raise HTTPException(401, "invalid or expired token", headers={"WWW-Authenticate": "Bearer"})
            return tok.user
        found = _cookie_user(request, db)
        if found is None:
            raise HTTPException(401, "log in first", headers={"WWW-Authenticate": "Bearer"})
        user, secret = found
        if request.method not in ("GET", "HEAD") and not auth.check_csrf(secret, request.headers.get("x-csrf-token")):
            raise HTTPException(403, "CSRF token missing or wrong")
        return user

    def page_user(request: Request, db: Session = Depends(get_db)) -> User:
        found = _cookie_user(request, db)
        if found is None:
            raise LoginRequired()
        request.state.csrf = auth.csrf_for(found[1])
        return found[0]

    def form_user(request: Request, csrf_token: str = Form("", max_length=100), db: Session = Depends(get_db)) -> User:
        found = _cookie_user(request, db)
        if found is None:
            raise LoginRequired()
        if not auth.check_csrf(found[1], csrf_token):
            raise HTTPException(403, "CSRF token missing or wrong")
        request.state.csrf = auth.csrf_for(found[1])
        return found[0]

    def need(user: User, role: str) -> User:
        if not auth.has_role(user, role):
            raise HTTPException(403, f"needs the {role} role")
        return user

    def role(minimum: str):
        """Dependency: the API caller, who must hold at least ``minimum``."""
        def check(user: User = Depends(api_user)) -> User:
            return need(user, minimum)
        return check

    @app.exception_handler(LoginRequired)
    async def to_login(request: Request, _exc: LoginRequired):
        return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)

    @app.exception_handler(tasks.NotFound)
    async def not_found(_r: Request, exc: Exception):
        return JSONResponse({"detail": str(exc)}, 404)

    @app.exception_handler(tasks.Forbidden)
    async def forbidden(_r: Request, exc: Exception):
        return JSONResponse({"detail": str(exc)}, 403)

    @app.exception_handler(tasks.Invalid)
    @app.exception_handler(UserError)
    async def invalid(_r: Request, exc: Exception):
        return JSONResponse({"detail": str(exc)}, 422)

    def page(request: Request, name: str, user: User | None, **ctx) -> HTMLResponse:
        ctx.update(user=user, csrf=getattr(request.state, "csrf", ""))
        return templates.TemplateResponse(request, name, ctx, status_code=ctx.pop("status", 200))

    # ------------------------------------------------------------ API: auth

    @app.post("/api/login")
    def api_login(body: LoginBody, db: Session = Depends(get_db)):
        user = auth.authenticate(db, body.username, body.password)
        if user is None:
            raise HTTPException(401, "wrong username or password")
        token = auth.issue_token(db, user, "api")
        db.commit()
        return {"token": token, "user": {"username": user.username, "role": user.role}}

    @app.post("/api/logout")
    def api_logout(request: Request, user: User = Depends(api_user), db: Session = Depends(get_db)):
        header = request.headers.get("authorization", "")
        secret = header[7:].strip() if header.lower().startswith("bearer ") else request.cookies.get(SESSION_COOKIE)
        auth.revoke(db, secret or "")
        db.commit()
        return {"ok": True}

    @app.get("/api/me")
    def api_me(user: User = Depends(api_user)):
        return {"username": user.username, "role": user.role}

    @app.post("/api/invites")
    def api_invite(body: InviteBody, request: Request, admin: User = Depends(role("admin")),
                   db: Session = Depends(get_db)):
        invitee = auth.create_user(db, body.username, body.role)
        token = auth.issue_token(db, invitee, "invite")
        db.commit()
        return {"username": invitee.username, "role": invitee.role, "token": token,
                "url": str(request.base_url) + f"invite/{token}"}

    @app.post("/api/invites/accept")
    def api_accept(body: AcceptBody, db: Session = Depends(get_db)):
        invite = auth.lookup_token(db, body.token, "invite")
        if invite is None:
            raise HTTPException(401, "invite link is invalid, used or expired")
        auth.set_password(invite.user, body.password)
        invite.used_at = auth.utcnow()
        token = auth.issue_token(db, invite.user, "api")
        db.commit()
        return {"token": token, "user": {"username": invite.user.username, "role": invite.user.role}}

    @app.get("/api/users")
    def api_users(admin: User = Depends(role("admin")), db: Session = Depends(get_db)):
        return [{"username": u.username, "role": u.role, "active": u.active,
                 "invited": u.password_hash is None} for u in db.scalars(select(User).order_by(User.id))]

    # ------------------------------------------------------------ API: rounds, queue, labels

    @app.get("/api/rounds")
    def api_rounds(user: User = Depends(api_user), db: Session = Depends(get_db)):
        return [{"name": r.name, "overlap": r.overlap, "criteria": r.criteria,
                 "progress": tasks.user_progress(db, user, r)}
                for r in db.scalars(select(Round).order_by(Round.id))]

    @app.post("/api/rounds", status_code=201)
    def api_create_round(body: RoundBody, admin: User = Depends(role("admin")), db: Session = Depends(get_db)):
        rnd = tasks.create_round(db, body.name, body.criteria, body.guidelines, body.overlap)
        return {"name": rnd.name, "criteria": rnd.criteria, "overlap": rnd.overlap}

    @app.post("/api/rounds/{name}/items", status_code=201)
    def api_add_items(name: str, body: ItemsBody, admin: User = Depends(role("admin")),
                      db: Session = Depends(get_db)):
        return {"added": tasks.add_items(db, tasks.get_round(db, name), body.items, body.kind)}

    @app.post("/api/rounds/{name}/next")
    def api_next(name: str, user: User = Depends(role("annotator")), db: Session = Depends(get_db)):
        rnd = tasks.get_round(db, name)
        a = tasks.next_task(db, user, rnd)
        if a is None:
            return Response(status_code=204)
        return tasks.task_view(a, rnd)

    @app.get("/api/tasks/{task_id}")
    def api_task(task_id: int, user: User = Depends(role("annotator")), db: Session = Depends(get_db)):
        a = tasks.owned_assignment(db, user, task_id)
        return tasks.task_view(a, a.prompt.round)

    @app.post("/api/tasks/{task_id}/label")
    def api_label(task_id: int, body: LabelBody, next: bool = False, user: User = Depends(role("annotator")),
                  db: Session = Depends(get_db)):
        """Store a label (committed before the answer). With ``?next=true`` the answer also carries the
        next task of the same round (or null), saving a round trip per label."""
        label, created = tasks.submit_label(db, user, task_id, body.model_dump())
        out = {"label_id": label.id, "task_id": task_id, "created": created, "skipped": label.skipped}
        if next:
            rnd = db.get(Assignment, task_id).prompt.round
            following = tasks.next_task(db, user, rnd)
            out["next"] = tasks.task_view(following, rnd) if following is not None else None
        return out

    @app.get("/api/rounds/{name}/progress")
    def api_progress(name: str, admin: User = Depends(role("admin")), db: Session = Depends(get_db)):
        return tasks.round_progress(db, tasks.get_round(db, name))

    @app.get("/api/rounds/{name}/agreement")
    def api_agreement(name: str, admin: User = Depends(role("admin")), db: Session = Depends(get_db)):
        return agreement.agreement_report(db, tasks.get_round(db, name))

    @app.get("/api/rounds/{name}/export")
    def api_export(name: str, format: str = Query("rankings"), include_unsafe: bool = False,
                   per_annotator: bool = False, admin: User = Depends(role("admin")),
                   db: Session = Depends(get_db)):
        if format not in FORMATS:
            raise HTTPException(422, f"format: one of {', '.join(FORMATS)}")
        records = export_records(db, tasks.get_round(db, name), format, include_unsafe, per_annotator)
        return PlainTextResponse(to_jsonl(records), media_type="application/x-ndjson", headers={
            "Content-Disposition": f'attachment; filename="{quote(name)}-{format}.jsonl"'})

    # ------------------------------------------------------------ API: review and side-by-side

    @app.post("/api/rounds/{name}/review/next")
    def api_next_review(name: str, user: User = Depends(role("reviewer")), db: Session = Depends(get_db)):
        cand = tasks.next_review(db, user, tasks.get_round(db, name))
        if cand is None:
            return Response(status_code=204)
        return {"sample_id": cand.id, "prompt": cand.prompt.text, "response": cand.text, "model": cand.model}

    @app.post("/api/reviews/{sample_id}")
    def api_review(sample_id: int, body: ReviewBody, user: User = Depends(role("reviewer")),
                   db: Session = Depends(get_db)):
        review = tasks.submit_review(db, user, sample_id, body.decision, body.reason)
        return {"review_id": review.id, "decision": review.decision}

    def comparison_view(comp: Comparison, db: Session) -> dict[str, Any]:
        left, right = db.get(Candidate, comp.left_id), db.get(Candidate, comp.right_id)
        return {"comparison_id": comp.id, "prompt": left.prompt.text, "left": left.text, "right": right.text}

    @app.post("/api/rounds/{name}/compare/next")
    def api_next_compare(name: str, body: CompareBody, user: User = Depends(role("annotator")),
                         db: Session = Depends(get_db)):
        comp = tasks.next_comparison(db, user, tasks.get_round(db, name), body.model_a, body.model_b)
        return Response(status_code=204) if comp is None else comparison_view(comp, db)

    @app.post("/api/comparisons/{comparison_id}")
    def api_vote(comparison_id: int, body: VoteBody, user: User = Depends(role("annotator")),
                 db: Session = Depends(get_db)):
        comp = tasks.vote(db, user, comparison_id, body.winner)
        return {"comparison_id": comp.id, "winner": comp.winner}

    @app.get("/api/rounds/{name}/winrates")
    def api_winrates(name: str, user: User = Depends(role("annotator")), db: Session = Depends(get_db)):
        return tasks.win_rates(db, tasks.get_round(db, name))

    # ------------------------------------------------------------ HTML: login, invites

    @app.get("/static/app.js")
    def static_js():
        return FileResponse(HERE / "templates" / "app.js", media_type="text/javascript")

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/"):
        token = secrets.token_urlsafe(24)
        response = page(request, "login.html", None, next=next, login_csrf=token)
        response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=secure_cookies)
        return response

    def _start_session(db: Session, user: User, next_url: str) -> RedirectResponse:
        secret = auth.issue_token(db, user, "session")
        db.commit()
        # Only local paths: an attacker-supplied next= must not send people to another site.
        target = next_url if next_url.startswith("/") and not next_url.startswith("//") else "/"
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, secret, httponly=True, samesite="lax", secure=secure_cookies,
                            max_age=int(auth.LIFETIMES["session"].total_seconds()))
        response.delete_cookie(LOGIN_CSRF_COOKIE)
        return response

    @app.post("/login")
    def login_submit(request: Request, username: str = Form(max_length=64), password: str = Form(max_length=256),
                     login_csrf: str = Form("", max_length=100), next: str = Form("/", max_length=500),
                     db: Session = Depends(get_db)):
        cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not cookie or not secrets.compare_digest(cookie, login_csrf):
            raise HTTPException(403, "CSRF token missing or wrong; reload the login page")
        user = auth.authenticate(db, username, password)
        if user is None:
            return page(request, "login.html", None, next=next, login_csrf=cookie,
                        error="Wrong username or password.", status=401)
        return _start_session(db, user, next)

    @app.post("/logout")
    def logout(request: Request, user: User = Depends(form_user), db: Session = Depends(get_db)):
        auth.revoke(db, request.cookies.get(SESSION_COOKIE, ""))
        db.commit()
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    @app.get("/invite/{token}", response_class=HTMLResponse)
    def invite_page(request: Request, token: str, db: Session = Depends(get_db)):
        invite = auth.lookup_token(db, token, "invite")
        if invite is None:
            return page(request, "message.html", None, title="Invite", status=404,
                        message="This invite link is invalid, used or expired. Ask an admin for a new one.")
        return page(request, "invite.html", None, token=token, invitee=invite.user)

    @app.post("/invite/{token}")
    def invite_submit(request: Request, token: str, password: str = Form(max_length=256),
                      password2: str = Form(max_length=256), db: Session = Depends(get_db)):
        invite = auth.lookup_token(db, token, "invite")
        if invite is None:
            raise HTTPException(401, "invite link is invalid, used or expired")
        try:
            if password != password2:
                raise UserError("the two passwords differ")
            auth.set_password(invite.user, password)
        except UserError as exc:
            return page(request, "invite.html", None, token=token, invitee=invite.user, error=str(exc), status=400)
        invite.used_at = auth.utcnow()
        return _start_session(db, invite.user, "/")

    # ------------------------------------------------------------ HTML: home and labelling

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request, user: User = Depends(page_user), db: Session = Depends(get_db)):
        rounds = [(r, tasks.user_progress(db, user, r)) for r in db.scalars(select(Round).order_by(Round.id))]
        return page(request, "home.html", user, rounds=rounds, is_reviewer=auth.has_role(user, "reviewer"),
                    is_admin=auth.has_role(user, "admin"))

    def label_page(request: Request, db: Session, user: User, rnd: Round, error: str = "", status: int = 200):
        a = tasks.next_task(db, user, rnd)
        progress = tasks.user_progress(db, user, rnd)
        task = tasks.task_view(a, rnd) if a is not None else None
        return page(request, "label.html", user, round=rnd, task=task, progress=progress, error=error,
                    status=status)

    @app.get("/rounds/{name}/label", response_class=HTMLResponse)
    def label_get(request: Request, name: str, user: User = Depends(page_user), db: Session = Depends(get_db)):
        return label_page(request, db, need(user, "annotator"), tasks.get_round(db, name))

    @app.post("/rounds/{name}/label")
    async def label_post(request: Request, name: str, user: User = Depends(form_user),
                         db: Session = Depends(get_db)):
        form = await request.form()
        # The database work blocks; run it off the event loop, on this request's session.
        return await run_in_threadpool(save_label_form, request, db, name, user, form)

    def save_label_form(request: Request, db: Session, name: str, user: User, form) -> Response:
        need(user, "annotator")
        rnd = tasks.get_round(db, name)
        task_id = form.get("task_id", "")
        try:
            if not str(task_id).isdigit():
                raise tasks.Invalid("task_id: missing")
            tasks.submit_label(db, user, int(task_id), label_from_form(form))
        except tasks.Invalid as exc:
            db.rollback()
            return label_page(request, db, user, rnd, error=str(exc), status=400)
        return RedirectResponse(f"/rounds/{quote(name)}/label?saved={task_id}", status_code=303)

    # ------------------------------------------------------------ HTML: review and side-by-side

    @app.get("/rounds/{name}/review", response_class=HTMLResponse)
    def review_get(request: Request, name: str, user: User = Depends(page_user), db: Session = Depends(get_db)):
        need(user, "reviewer")
        rnd = tasks.get_round(db, name)
        sample = tasks.next_review(db, user, rnd)
        return page(request, "review.html", user, round=rnd, sample=sample)

    @app.post("/rounds/{name}/review")
    def review_post(request: Request, name: str, sample_id: int = Form(), decision: str = Form(max_length=16),
                    reason: str = Form("", max_length=tasks.MAX_COMMENT_CHARS), user: User = Depends(form_user),
                    db: Session = Depends(get_db)):
        need(user, "reviewer")
        rnd = tasks.get_round(db, name)
        try:
            tasks.submit_review(db, user, sample_id, decision, reason)
        except tasks.Invalid as exc:
            return page(request, "review.html", user, round=rnd, sample=db.get(Candidate, sample_id),
                        error=str(exc), status=400)
        return RedirectResponse(f"/rounds/{quote(name)}/review", status_code=303)

    @app.get("/rounds/{name}/compare", response_class=HTMLResponse)
    def compare_get(request: Request, name: str, model_a: str = Query("", max_length=255),
                    model_b: str = Query("", max_length=255), user: User = Depends(page_user),
                    db: Session = Depends(get_db)):
        need(user, "annotator")
        rnd = tasks.get_round(db, name)
        comp = view = None
        if model_a and model_b and model_a != model_b:
            comp = tasks.next_comparison(db, user, rnd, model_a, model_b)
            view = comparison_view(comp, db) if comp is not None else None
        rates = tasks.win_rates(db, rnd)
        chart = charts.interval_chart([(f"{r['model_a']} vs {r['model_b']}", r["win_rate"], r["ci_low"],
                                        r["ci_high"]) for r in rates])
        return page(request, "compare.html", user, round=rnd, models=tasks.round_models(db, rnd), model_a=model_a,
                    model_b=model_b, comparison=view, rates=rates, chart=chart)

    @app.post("/rounds/{name}/compare")
    def compare_post(name: str, comparison_id: int = Form(), winner: str = Form(max_length=8),
                     user: User = Depends(form_user), db: Session = Depends(get_db)):
        need(user, "annotator")
        try:
            comp = tasks.vote(db, user, comparison_id, winner)
        except tasks.Invalid as exc:
            raise HTTPException(400, str(exc)) from None
        return RedirectResponse(f"/rounds/{quote(name)}/compare?model_a={quote(comp.model_a)}"
                                f"&model_b={quote(comp.model_b)}", status_code=303)

    # ------------------------------------------------------------ HTML: admin

    @app.get("/admin", response_class=HTMLResponse)
    def admin_home(request: Request, user: User = Depends(page_user), db: Session = Depends(get_db)):
        need(user, "admin")
        rounds = list(db.scalars(select(Round).order_by(Round.id)))
        progress = [tasks.round_progress(db, r) for r in rounds]
        chart = charts.progress_bars([(p["round"], p["labels"], p["slots"]) for p in progress])
        users = list(db.scalars(select(User).order_by(User.id)))
        return page(request, "admin.html", user, rounds=progress, chart=chart, users=users,
                    default_criteria=DEFAULT_CRITERIA)

    @app.post("/admin/rounds")
    def admin_create_round(request: Request, name: str = Form(max_length=100),
                           criteria: str = Form("", max_length=2000), guidelines: str = Form("", max_length=20_000),
                           overlap: int = Form(1), user: User = Depends(form_user), db: Session = Depends(get_db)):
        need(user, "admin")
        crit = parse_criteria(criteria) if criteria.strip() else [dict(c) for c in DEFAULT_CRITERIA]
        rnd = tasks.create_round(db, name, crit, guidelines, overlap)
        return RedirectResponse(f"/admin/rounds/{quote(rnd.name)}", status_code=303)

    @app.post("/admin/rounds/{name}/upload")
    async def admin_upload(name: str, file: UploadFile, kind: str = Form("candidate", max_length=16),
                           user: User = Depends(form_user), db: Session = Depends(get_db)):
        need(user, "admin")
        items = parse_jsonl_upload(await file.read(MAX_BODY_BYTES + 1))
        if kind not in ("candidate", "policy"):
            raise HTTPException(422, "kind: candidate or policy")
        await run_in_threadpool(lambda: tasks.add_items(db, tasks.get_round(db, name), items, kind))
        return RedirectResponse(f"/admin/rounds/{quote(name)}", status_code=303)

    @app.post("/admin/invites", response_class=HTMLResponse)
    def admin_invite(request: Request, username: str = Form(max_length=64), role_: str = Form(alias="role"),
                     user: User = Depends(form_user), db: Session = Depends(get_db)):
        need(user, "admin")
        invitee = auth.create_user(db, username, role_)
        token = auth.issue_token(db, invitee, "invite")
        db.commit()
        return page(request, "message.html", user, title="Invite created",
                    message=f"Send this one-time link to {invitee.username} ({invitee.role}); it works once, "
                            "for 7 days:", link=str(request.base_url) + f"invite/{token}")

    @app.get("/admin/rounds/{name}", response_class=HTMLResponse)
    def admin_round(request: Request, name: str, user: User = Depends(page_user), db: Session = Depends(get_db)):
        need(user, "admin")
        rnd = tasks.get_round(db, name)
        progress = tasks.round_progress(db, rnd)
        report = agreement.agreement_report(db, rnd)
        per_user = sorted(progress["per_annotator"].items())
        items = progress["items"] or 1
        progress_chart = charts.progress_bars([("all labels", progress["labels"], progress["slots"])]
                                              + [(n, c["done"], items) for n, c in per_user])
        tau_chart = charts.line_chart([(p["until"], p["tau"]) for p in report["rankings"]["over_time"]])
        rates = tasks.win_rates(db, rnd)
        rate_chart = charts.interval_chart([(f"{r['model_a']} vs {r['model_b']}", r["win_rate"], r["ci_low"],
                                             r["ci_high"]) for r in rates])
        return page(request, "round_admin.html", user, round=rnd, progress=progress, report=report,
                    progress_chart=progress_chart, tau_chart=tau_chart, rate_chart=rate_chart, rates=rates,
                    formats=FORMATS)

    @app.get("/admin/rounds/{name}/export")
    def admin_export(name: str, format: str = Query("rankings"), include_unsafe: bool = False,
                     per_annotator: bool = False, user: User = Depends(page_user), db: Session = Depends(get_db)):
        return api_export(name, format, include_unsafe, per_annotator, need(user, "admin"), db)

    return app


# ---------------------------------------------------------------- form parsing


def label_from_form(form) -> dict[str, Any]:
    """The label payload from the HTML form: rank_<cid> (1 = best), rate_<cid>_<criterion>,
    flag_<cid> (repeated), comment, and action=skip."""
    if form.get("action") == "skip":
        return {"skip": True, "comment": str(form.get("comment", ""))}
    ranks, ratings, flags = {}, {}, []
    for key, value in form.multi_items():
        parts = key.split("_", 2)
        try:
            if parts[0] == "rank" and len(parts) == 2:
                ranks[int(parts[1])] = int(value)
            elif parts[0] == "rate" and len(parts) == 3 and value != "":
                ratings.setdefault(int(parts[1]), {})[parts[2]] = float(value)
            elif parts[0] == "flag" and len(parts) == 2:
                flags.append({"candidate_id": int(parts[1]), "kind": str(value)})
        except ValueError:
            raise tasks.Invalid(f"{key}: not a number") from None
    if sorted(ranks.values()) != list(range(1, len(ranks) + 1)):
        raise tasks.Invalid("ranking: give each response a different rank from 1 (best) to "
                            f"{len(ranks)}")
    ranking = sorted(ranks, key=ranks.get)
    return {"ranking": ranking, "ratings": ratings, "flags": flags, "comment": str(form.get("comment", ""))}


def parse_criteria(text: str) -> list[dict[str, Any]]:
    """``name:min-max:guideline`` per line, e.g. ``relevance:1-7:Does it answer the question?``."""
    out = []
    for n, line in enumerate(text.strip().splitlines(), 1):
        name, _, rest = line.strip().partition(":")
        scale, _, guideline = rest.partition(":")
        lo, _, hi = scale.partition("-")
        try:
            out.append({"name": name.strip(), "min": int(lo), "max": int(hi), "guideline": guideline.strip()})
        except ValueError:
            raise tasks.Invalid(f"criteria line {n}: write name:min-max:guideline") from None
    return out


def parse_jsonl_upload(data: bytes) -> list[dict[str, Any]]:
    import json

    if len(data) > MAX_BODY_BYTES:
        raise HTTPException(413, "file too large")
    items = []
    for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise tasks.Invalid(f"upload line {n}: not JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise tasks.Invalid(f"upload line {n}: expected an object with 'prompt' and 'responses'")
        items.append(item)
    return items

