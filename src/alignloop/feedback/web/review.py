"""Reviewing policy samples (approve, or flag with a reason): the JSON API and the HTML page."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from alignloop.feedback import tasks
from alignloop.feedback.db import Candidate
from alignloop.feedback.web.deps import API_PREFIX, DB, Reviewer
from alignloop.feedback.web.pages import render
from alignloop.feedback.web.schemas import API_ERRORS, MAX_ROW_ID, ReviewBody, ReviewOut, ReviewSample, RowId

api = APIRouter(prefix=API_PREFIX, tags=["review"], responses=API_ERRORS)
pages = APIRouter(tags=["review"], include_in_schema=False)


@api.post("/rounds/{name}/review/next", response_model=ReviewSample,
          responses={204: {"description": "no sample waiting for the caller"}})
def api_next_review(name: str, user: Reviewer, db: DB) -> Any:
    sample = tasks.next_review(db, user, tasks.get_round(db, name))
    if sample is None:
        return Response(status_code=204)
    return ReviewSample(sample_id=sample.id, prompt=sample.prompt.text, response=sample.text,
                        model=sample.model)


@api.post("/reviews/{sample_id}", response_model=ReviewOut)
def api_review(sample_id: RowId, body: ReviewBody, user: Reviewer, db: DB) -> ReviewOut:
    review = tasks.submit_review(db, user, sample_id, body.decision, body.reason)
    return ReviewOut(review_id=review.id, decision=review.decision)


@pages.get("/rounds/{name}/review", response_class=HTMLResponse)
def review_get(request: Request, name: str, user: Reviewer, db: DB) -> Response:
    rnd = tasks.get_round(db, name)
    return render(request, "review.html", user, round=rnd, sample=tasks.next_review(db, user, rnd))


@pages.post("/rounds/{name}/review")
def review_post(request: Request, name: str, user: Reviewer, db: DB, sample_id: Annotated[int, Form(ge=1, le=MAX_ROW_ID)],
                decision: Annotated[str, Form(max_length=16)],
                reason: Annotated[str, Form(max_length=tasks.MAX_COMMENT_CHARS)] = "") -> Response:
    rnd = tasks.get_round(db, name)
    try:
        tasks.submit_review(db, user, sample_id, decision, reason)
    except tasks.Invalid as exc:
        # Show the sample again with the message instead of an error page.
        return render(request, "review.html", user, status=400, round=rnd,
                      sample=db.get(Candidate, sample_id), error=str(exc))
    return RedirectResponse(f"/rounds/{quote(name)}/review", status_code=303)
