"""Blind side-by-side: pairs of two models' answers, votes and win rates (JSON API and HTML page)."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from alignloop.feedback import tasks
from alignloop.feedback.db import Candidate, Comparison
from alignloop.feedback.web.deps import API_PREFIX, DB, Annotator
from alignloop.feedback.web.pages import render, win_rate_chart
from alignloop.feedback.web.schemas import (
    API_ERRORS,
    MAX_ROW_ID,
    CompareBody,
    ComparisonView,
    RowId,
    VoteBody,
    VoteOut,
    WinRate,
)

api = APIRouter(prefix=API_PREFIX, tags=["compare"], responses=API_ERRORS)
pages = APIRouter(tags=["compare"], include_in_schema=False)


def comparison_view(db: Session, comp: Comparison) -> ComparisonView:
    left, right = db.get(Candidate, comp.left_id), db.get(Candidate, comp.right_id)
    return ComparisonView(comparison_id=comp.id, prompt=left.prompt.text, left=left.text, right=right.text)


@api.post("/rounds/{name}/compare/next", response_model=ComparisonView,
          responses={204: {"description": "no pair of these two models left for the caller"}})
def api_next_comparison(name: str, body: CompareBody, user: Annotator, db: DB) -> Any:
    comp = tasks.next_comparison(db, user, tasks.get_round(db, name), body.model_a, body.model_b)
    return Response(status_code=204) if comp is None else comparison_view(db, comp)


@api.post("/comparisons/{comparison_id}", response_model=VoteOut)
def api_vote(comparison_id: RowId, body: VoteBody, user: Annotator, db: DB) -> VoteOut:
    comp = tasks.vote(db, user, comparison_id, body.winner)
    return VoteOut(comparison_id=comp.id, winner=comp.winner)


@api.get("/rounds/{name}/winrates", response_model=list[WinRate])
def api_win_rates(name: str, user: Annotator, db: DB) -> list[dict[str, Any]]:
    return tasks.win_rates(db, tasks.get_round(db, name))


@pages.get("/rounds/{name}/compare", response_class=HTMLResponse)
def compare_get(request: Request, name: str, user: Annotator, db: DB,
                model_a: Annotated[str, Query(max_length=255)] = "",
                model_b: Annotated[str, Query(max_length=255)] = "") -> Response:
    rnd = tasks.get_round(db, name)
    view = None
    if model_a and model_b and model_a != model_b:
        comp = tasks.next_comparison(db, user, rnd, model_a, model_b)
        view = comparison_view(db, comp) if comp is not None else None
    rates = tasks.win_rates(db, rnd)
    return render(request, "compare.html", user, round=rnd, models=tasks.round_models(db, rnd),
                  model_a=model_a, model_b=model_b, comparison=view, rates=rates, chart=win_rate_chart(rates))


@pages.post("/rounds/{name}/compare")
def compare_post(name: str, user: Annotator, db: DB, comparison_id: Annotated[int, Form(ge=1, le=MAX_ROW_ID)],
                 winner: Annotated[str, Form(max_length=8)]) -> Response:
    comp = tasks.vote(db, user, comparison_id, winner)
    return RedirectResponse(f"/rounds/{quote(name)}/compare?model_a={quote(comp.model_a)}"
                            f"&model_b={quote(comp.model_b)}", status_code=303)
