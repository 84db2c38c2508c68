"""Admin: rounds, items, invites, users, progress, agreement and export (JSON API and HTML pages).

Both routers carry ``require("admin")`` as a router dependency, so no route added here can forget it.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from alignloop.feedback import agreement, auth, charts, tasks
from alignloop.feedback.db import DEFAULT_CRITERIA, DEFAULT_LEASE_MINUTES
from alignloop.feedback.export import FORMATS, export_records, to_jsonl
from alignloop.feedback.web.deps import API_PREFIX, DB, Admin, Now, require
from alignloop.feedback.web.forms import parse_criteria, parse_jsonl_upload
from alignloop.feedback.web.middleware import MAX_BODY_BYTES
from alignloop.feedback.web.pages import render, win_rate_chart
from alignloop.feedback.web.schemas import (
    API_ERRORS,
    JSON_ERRORS,
    AgreementReport,
    ExportFormat,
    InviteBody,
    InviteOut,
    ItemKind,
    ItemsAdded,
    ItemsBody,
    RoundBody,
    RoundOut,
    RoundProgress,
    UserRow,
)

ADMIN_ONLY = [Depends(require("admin"))]
api = APIRouter(prefix=API_PREFIX, tags=["admin"], dependencies=ADMIN_ONLY, responses=API_ERRORS)
pages = APIRouter(tags=["admin"], dependencies=ADMIN_ONLY, include_in_schema=False)


class JSONLinesResponse(PlainTextResponse):
    """One JSON record a line (what ``alignloop feedback export`` writes)."""

    media_type = "application/x-ndjson"


def invite_url(request: Request, token: str) -> str:
    return str(request.base_url) + f"invite/{token}"


def export_response(db: Session, name: str, fmt: str, include_unsafe: bool, per_annotator: bool) -> Response:
    records = export_records(db, tasks.get_round(db, name), fmt, include_unsafe, per_annotator)
    return JSONLinesResponse(to_jsonl(records), headers={
        "Content-Disposition": f'attachment; filename="{quote(name)}-{fmt}.jsonl"'})


# ---------------------------------------------------------------- JSON API


@api.post("/invites", response_model=InviteOut)
def api_invite(body: InviteBody, request: Request, db: DB) -> InviteOut:
    invitee, token = auth.invite(db, body.username, body.role)
    return InviteOut(username=invitee.username, role=invitee.role, token=token,
                     url=invite_url(request, token))


@api.get("/users", response_model=list[UserRow])
def api_users(db: DB, now: Now) -> list[UserRow]:
    failures = auth.failed_logins(db, now)
    return [UserRow(username=u.username, role=u.role, active=u.active, invited=u.password_hash is None,
                    failed_logins=failures.get(u.username, 0)) for u in auth.list_users(db)]


@api.post("/rounds", status_code=201, response_model=RoundOut)
def api_create_round(body: RoundBody, db: DB) -> dict[str, Any]:
    rnd = tasks.create_round(db, body.name, [c.model_dump() for c in body.criteria], body.guidelines,
                             body.overlap, body.lease_minutes)
    return {"name": rnd.name, "criteria": rnd.criteria, "overlap": rnd.overlap, "lease_minutes": rnd.lease_minutes}


@api.post("/rounds/{name}/items", status_code=201, response_model=ItemsAdded)
def api_add_items(name: str, body: ItemsBody, db: DB) -> ItemsAdded:
    items = [item.model_dump(exclude_unset=True) for item in body.items]
    return ItemsAdded(added=tasks.add_items(db, tasks.get_round(db, name), items, body.kind))


@api.get("/rounds/{name}/progress", response_model=RoundProgress)
def api_progress(name: str, db: DB) -> dict[str, Any]:
    return tasks.round_progress(db, tasks.get_round(db, name))


@api.get("/rounds/{name}/agreement", response_model=AgreementReport)
def api_agreement(name: str, db: DB) -> dict[str, Any]:
    return agreement.agreement_report(db, tasks.get_round(db, name))


@api.get("/rounds/{name}/export", response_class=JSONLinesResponse, responses=JSON_ERRORS)
def api_export(name: str, db: DB, fmt: Annotated[ExportFormat, Query(alias="format")] = "rankings",
               include_unsafe: bool = False, per_annotator: bool = False) -> Response:
    return export_response(db, name, fmt, include_unsafe, per_annotator)


# ---------------------------------------------------------------- HTML


@pages.get("/admin", response_class=HTMLResponse)
def admin_home(request: Request, user: Admin, db: DB, now: Now) -> Response:
    progress = [tasks.round_progress(db, r) for r in tasks.list_rounds(db)]
    chart = charts.progress_bars([(p["round"], p["labels"], p["slots"]) for p in progress])
    return render(request, "admin.html", user, rounds=progress, chart=chart, users=auth.list_users(db),
                  failed_logins=auth.failed_logins(db, now), default_criteria=DEFAULT_CRITERIA,
                  default_lease=DEFAULT_LEASE_MINUTES)


@pages.post("/admin/rounds")
def admin_create_round(db: DB, name: Annotated[str, Form(max_length=100)],
                       criteria: Annotated[str, Form(max_length=2000)] = "",
                       guidelines: Annotated[str, Form(max_length=20_000)] = "",
                       overlap: Annotated[int, Form()] = 1,
                       lease_minutes: Annotated[int, Form()] = DEFAULT_LEASE_MINUTES) -> Response:
    crit = parse_criteria(criteria) if criteria.strip() else [dict(c) for c in DEFAULT_CRITERIA]
    rnd = tasks.create_round(db, name, crit, guidelines, overlap, lease_minutes)
    return RedirectResponse(f"/admin/rounds/{quote(rnd.name)}", status_code=303)


@pages.post("/admin/rounds/{name}/upload")
async def admin_upload(name: str, file: UploadFile, db: DB,
                       kind: Annotated[ItemKind, Form()] = "candidate") -> Response:
    items = parse_jsonl_upload(await file.read(MAX_BODY_BYTES + 1))
    await run_in_threadpool(lambda: tasks.add_items(db, tasks.get_round(db, name), items, kind))
    return RedirectResponse(f"/admin/rounds/{quote(name)}", status_code=303)


@pages.post("/admin/invites", response_class=HTMLResponse)
def admin_invite(request: Request, user: Admin, db: DB, username: Annotated[str, Form(max_length=64)],
                 role: Annotated[str, Form(max_length=16)]) -> Response:
    invitee, token = auth.invite(db, username, role)
    return render(request, "message.html", user, title="Invite created",
                  message=f"Send this one-time link to {invitee.username} ({invitee.role}); it works once, "
                          "for 7 days:", link=invite_url(request, token))


@pages.get("/admin/rounds/{name}", response_class=HTMLResponse)
def admin_round(request: Request, name: str, user: Admin, db: DB) -> Response:
    rnd = tasks.get_round(db, name)
    progress = tasks.round_progress(db, rnd)
    report = agreement.agreement_report(db, rnd)
    items = progress["items"] or 1
    per_user = sorted(progress["per_annotator"].items())
    progress_chart = charts.progress_bars([("all labels", progress["labels"], progress["slots"])]
                                          + [(n, c["done"], items) for n, c in per_user])
    tau_chart = charts.line_chart([(p["until"], p["tau"]) for p in report["rankings"]["over_time"]])
    rates = tasks.win_rates(db, rnd)
    return render(request, "round_admin.html", user, round=rnd, progress=progress, report=report,
                  progress_chart=progress_chart, tau_chart=tau_chart, rate_chart=win_rate_chart(rates),
                  rates=rates, formats=FORMATS)


@pages.get("/admin/rounds/{name}/export")
def admin_export(name: str, db: DB, fmt: Annotated[ExportFormat, Query(alias="format")] = "rankings",
                 include_unsafe: bool = False, per_annotator: bool = False) -> Response:
    return export_response(db, name, fmt, include_unsafe, per_annotator)
