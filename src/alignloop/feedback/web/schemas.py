"""The JSON API's shapes: request bodies (sizes bounded, unknown keys refused) and response models.

Every JSON route declares its response model, so the OpenAPI schema (``app.openapi()``) describes what
clients really receive. The rules on the values (a ranking lists every candidate once, ratings stay on
their scale, ...) live in ``feedback.tasks``; these models only fix the shapes and the size bounds.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from alignloop.feedback import tasks
from alignloop.feedback.db import DEFAULT_CRITERIA, DEFAULT_LEASE_MINUTES

Role = Literal["annotator", "reviewer", "admin"]
ItemKind = Literal["candidate", "policy"]
# The same names as feedback.export.FORMATS (a test keeps them equal).
ExportFormat = Literal["rankings", "pairs", "ratings", "unpaired"]


# A row id in a path: bounded, so that a huge number is a 422 instead of an overflow in the database driver.
MAX_ROW_ID = 2**63 - 1
RowId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]


# ---------------------------------------------------------------- request bodies


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginBody(Body):
    username: str = Field(max_length=64)
    password: str = Field(max_length=256)


class CriterionIn(BaseModel):
    """One rating scale; keys beyond these are ignored."""

    name: str = Field(max_length=64)
    min: StrictInt = 1
    max: StrictInt = 7
    guideline: str = ""


class RoundBody(Body):
    name: str = Field(min_length=1, max_length=100)
    criteria: list[CriterionIn] = Field(default_factory=lambda: [CriterionIn(**c) for c in DEFAULT_CRITERIA],
                                        max_length=tasks.MAX_CRITERIA)
    guidelines: str = Field("", max_length=20_000)
    overlap: int = Field(1, ge=1, le=50)
    lease_minutes: int = Field(DEFAULT_LEASE_MINUTES, ge=1, le=tasks.MAX_LEASE_MINUTES)


ResponseText = Annotated[str, Field(max_length=tasks.MAX_RESPONSE_CHARS)]


class ResponseIn(BaseModel):
    text: ResponseText
    model: str = Field("", max_length=255)
    generation: dict[str, Any] = Field(default_factory=dict)


class MessageIn(Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(max_length=tasks.MAX_PROMPT_CHARS)


class ItemIn(BaseModel):
    """A prompt with its responses (plain texts or {text, model, generation}) and an optional gold ranking
    (response indices, best first); for kind=policy also one line of a PPO run's samples.jsonl
    ({step, prompt, response, ...}), whose other keys are kept out of the way. A chat prompt gives its
    ``messages`` too (``prompt`` is then what annotators see); exports give such a prompt as messages."""

    model_config = ConfigDict(extra="allow")
    prompt: str = Field(min_length=1, max_length=tasks.MAX_PROMPT_CHARS)
    messages: list[MessageIn] | None = Field(None, min_length=1, max_length=tasks.MAX_MESSAGES)
    responses: list[ResponseText | ResponseIn] | None = Field(None, max_length=16)
    response: ResponseText | None = None
    step: int | None = None
    model: str | None = Field(None, max_length=255)
    gold_ranking: list[int] | None = Field(None, max_length=16)


class ItemsBody(Body):
    items: list[ItemIn] = Field(max_length=10_000)
    kind: ItemKind = "candidate"


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
    role: Role = "annotator"


class AcceptBody(Body):
    token: str = Field(max_length=200)
    password: str = Field(max_length=256)


# ---------------------------------------------------------------- responses


class ErrorOut(BaseModel):
    detail: str


class InvalidOut(BaseModel):
    """A rule of the service layer was broken (a message) or the request has the wrong shape (FastAPI's
    list of validation errors)."""

    detail: str | list[dict[str, Any]]


# The error answers every JSON route may give (errors.py makes them).
API_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "the body is not valid JSON"},
    401: {"model": ErrorOut, "description": "not logged in, or wrong credentials"},
    403: {"model": ErrorOut, "description": "the caller's role or CSRF token does not allow this"},
    404: {"model": ErrorOut, "description": "no such round, task, sample or comparison"},
    413: {"model": ErrorOut, "description": "the request body is larger than the app accepts (8 MiB)"},
    422: {"model": InvalidOut, "description": "the request breaks a rule or has the wrong shape"},
}
# For a route whose own answer is not JSON: its errors still are, and FastAPI would document them under the
# route's media type, so they are spelled out (the models are in the schema through the other routes).
JSON_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": e["description"],
           "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{e['model'].__name__}"}}}}
    for code, e in API_ERRORS.items()}
THROTTLED: dict[int | str, dict[str, Any]] = {
    429: {"model": ErrorOut, "description": "too many failed logins from this address; see Retry-After",
          "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}},
}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorOut, "description": "the database does not answer"},
}
LEASE_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorOut, "description": "the task's lease ran out and the item has no room left"},
}


class HealthOut(BaseModel):
    status: Literal["ok"]


class UserOut(BaseModel):
    username: str
    role: Role


class TokenOut(BaseModel):
    """An API token for ``Authorization: Bearer`` and whose it is."""

    token: str
    user: UserOut


class OkOut(BaseModel):
    ok: bool


class InviteOut(BaseModel):
    username: str
    role: Role
    token: str
    url: str


class UserRow(BaseModel):
    username: str
    role: Role
    active: bool
    invited: bool  # invited but no password chosen yet
    failed_logins: int  # failed logins under this username over the last day, from any address


class Criterion(BaseModel):
    name: str
    min: int
    max: int
    guideline: str


class UserProgress(BaseModel):
    done: int
    skipped: int
    items: int


class RoundRow(BaseModel):
    name: str
    overlap: int
    lease_minutes: int
    criteria: list[Criterion]
    progress: UserProgress  # the caller's own


class RoundOut(BaseModel):
    name: str
    criteria: list[Criterion]
    overlap: int
    lease_minutes: int


class ItemsAdded(BaseModel):
    added: int


class CandidateView(BaseModel):
    id: int
    text: str


class TaskView(BaseModel):
    """An item to label: candidates in this annotator's own order, without model names."""

    task_id: int
    round: str
    status: Literal["open", "done", "skipped", "expired"]
    # UTC; an open task not labelled by then goes back to the queue (a late label is kept only while the
    # item has room). Null for tasks handed out before leases existed.
    lease_expires_at: dt.datetime | None
    prompt: str
    candidates: list[CandidateView]
    criteria: list[Criterion]
    guidelines: str
    flag_kinds: list[str]


class LabelOut(BaseModel):
    label_id: int
    task_id: int
    created: bool  # false: the task was labelled before and this is the stored label
    skipped: bool
    next: TaskView | None = None  # only with ?next=true (null when the queue is empty)


class AnnotatorCounts(BaseModel):
    done: int
    skipped: int


class RoundProgress(BaseModel):
    round: str
    items: int
    overlap: int
    slots: int
    labels: int
    per_annotator: dict[str, AnnotatorCounts]
    policy_samples: int
    reviews: int


class TauPoint(BaseModel):
    until: str
    pairs: int
    tau: float


class RankingAgreement(BaseModel):
    kendall_tau: float | None
    pairs: int
    over_time: list[TauPoint]


class GoldAgreement(BaseModel):
    tau: float
    items: int


class AgreementReport(BaseModel):
    rankings: RankingAgreement
    ratings_alpha: dict[str, float | None]  # Krippendorff's alpha per criterion; null where undefined
    gold: dict[str, GoldAgreement]  # per annotator


class ReviewSample(BaseModel):
    sample_id: int
    prompt: str
    response: str
    model: str


class ReviewOut(BaseModel):
    review_id: int
    decision: Literal["approve", "flag"]


class ComparisonView(BaseModel):
    """A blind pair: which model wrote which side is not shown."""

    comparison_id: int
    prompt: str
    left: str
    right: str


class VoteOut(BaseModel):
    comparison_id: int
    winner: Literal["left", "right", "tie"]


class WinRate(BaseModel):
    """model_a's win rate over model_b (a tie counts half) with its 95% Wilson interval."""

    model_a: str
    model_b: str
    a_wins: int
    b_wins: int
    ties: int
    n: int
    win_rate: float
    ci_low: float
    ci_high: float
