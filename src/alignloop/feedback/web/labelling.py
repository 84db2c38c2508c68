"""Labelling: the rounds and the caller's queue, tasks and labels (JSON API), the home page and the
labelling page (HTML)."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData

from alignloop.feedback import auth, tasks
from alignloop.feedback.db import Assignment, Round, User
from alignloop.feedback.web.deps import API_PREFIX, DB, Annotator, Now
from alignloop.feedback.web.forms import label_from_form
from alignloop.feedback.web.pages import render
from alignloop.feedback.web.schemas import (
    API_ERRORS,
    LEASE_CONFLICT,
    LabelBody,
    LabelOut,
    RoundRow,
    RowId,
    TaskView,
)

api = APIRouter(prefix=API_PREFIX, tags=["labelling"], responses=API_ERRORS)
pages = APIRouter(tags=["labelling"], include_in_schema=False)
NO_CONTENT = {204: {"description": "nothing left for the caller in this queue"}}


# ---------------------------------------------------------------- JSON API


@api.get("/rounds", response_model=list[RoundRow])
def api_rounds(user: Annotator, db: DB) -> list[dict[str, Any]]:
    return [{"name": r.name, "overlap": r.overlap, "lease_minutes": r.lease_minutes, "criteria": r.criteria,
             "progress": tasks.user_progress(db, user, r)} for r in tasks.list_rounds(db)]


@api.post("/rounds/{name}/next", response_model=TaskView, responses=NO_CONTENT)
def api_next_task(name: str, user: Annotator, db: DB, now: Now) -> Any:
    rnd = tasks.get_round(db, name)
    assignment = tasks.next_task(db, user, rnd, now)
    if assignment is None:
        return Response(status_code=204)
    return tasks.task_view(assignment, rnd)


@api.get("/tasks/{task_id}", response_model=TaskView)
def api_task(task_id: RowId, user: Annotator, db: DB) -> dict[str, Any]:
    assignment = tasks.owned_assignment(db, user, task_id)
    return tasks.task_view(assignment, assignment.prompt.round)


@api.post("/tasks/{task_id}/label", response_model=LabelOut, response_model_exclude_unset=True,
          responses=LEASE_CONFLICT)
def api_label(task_id: RowId, body: LabelBody, user: Annotator, db: DB, now: Now,
              with_next: Annotated[bool, Query(alias="next")] = False) -> dict[str, Any]:
    """Store a label (committed before the answer). With ``?next=true`` the answer also carries the
    next task of the same round (or null), saving a round trip per label. A label on an expired lease is
    kept only while the item has room (409 otherwise)."""
    label, created = tasks.submit_label(db, user, task_id, body.model_dump())
    out: dict[str, Any] = {"label_id": label.id, "task_id": task_id, "created": created,
                           "skipped": label.skipped}
    if with_next:
        rnd = db.get(Assignment, task_id).prompt.round
        following = tasks.next_task(db, user, rnd, now)
        out["next"] = tasks.task_view(following, rnd) if following is not None else None
    return out


# ---------------------------------------------------------------- HTML


@pages.get("/", response_class=HTMLResponse)
def home(request: Request, user: Annotator, db: DB) -> Response:
    rounds = [(r, tasks.user_progress(db, user, r)) for r in tasks.list_rounds(db)]
    return render(request, "home.html", user, rounds=rounds, is_reviewer=auth.has_role(user, "reviewer"),
                  is_admin=auth.has_role(user, "admin"))


def label_page(request: Request, db: Session, user: User, rnd: Round, now: dt.datetime, error: str = "",
               status: int = 200) -> Response:
    assignment = tasks.next_task(db, user, rnd, now)
    progress = tasks.user_progress(db, user, rnd)
    task = tasks.task_view(assignment, rnd) if assignment is not None else None
    return render(request, "label.html", user, status=status, round=rnd, task=task, progress=progress,
                  error=error)


@pages.get("/rounds/{name}/label", response_class=HTMLResponse)
def label_get(request: Request, name: str, user: Annotator, db: DB, now: Now) -> Response:
    return label_page(request, db, user, tasks.get_round(db, name), now)


@pages.post("/rounds/{name}/label")
async def label_post(request: Request, name: str, user: Annotator, db: DB, now: Now) -> Response:
    form = await request.form()
    # The database work blocks; run it off the event loop, on this request's session.
    return await run_in_threadpool(save_label_form, request, db, name, user, form, now)


def save_label_form(request: Request, db: Session, name: str, user: User, form: FormData,
                    now: dt.datetime) -> Response:
    rnd = tasks.get_round(db, name)
    task_id = form.get("task_id", "")
    try:
        # ASCII digits, at most 18 (below MAX_ROW_ID): int() of anything else fails or overflows the database.
        if not (isinstance(task_id, str) and re.fullmatch(r"[0-9]{1,18}", task_id)):
            raise tasks.Invalid("task_id: missing")
        tasks.submit_label(db, user, int(task_id), label_from_form(form))
    except (tasks.Invalid, tasks.Conflict) as exc:
        # Show the form again with the message instead of an error page.
        db.rollback()
        return label_page(request, db, user, rnd, now, error=str(exc),
                          status=409 if isinstance(exc, tasks.Conflict) else 400)
    return RedirectResponse(f"/rounds/{quote(name)}/label?saved={task_id}", status_code=303)
