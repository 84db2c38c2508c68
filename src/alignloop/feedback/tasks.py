"""The feedback workflow on the database: rounds, prompt upload, the labelling queue with overlap,
label submission, the review queue for policy samples and blind side-by-side votes.

Both the JSON API and the HTML pages call these functions, so the rules live once. Every function
works inside the caller's session and commits before returning when it changes something, so a
200 answer always means the change is on disk.

Assignment: an item (a prompt with its K candidates) may be handed to at most ``round.overlap``
people. The free slots are counted in ``prompts.assigned`` and taken with one conditional UPDATE
(``SET assigned = assigned + 1 WHERE assigned < overlap``), which both SQLite and PostgreSQL
execute atomically, so concurrent requests never over-assign. Skipping gives the slot back.

Leases: an assignment holds its slot for the round's ``lease_minutes``. Asking for the next task first
expires the round's open assignments whose lease has run out (``status`` open -> expired, again one
conditional UPDATE per assignment, so a slot is given back once) and gives their slots back, so an
annotator who closed the tab does not block the quota. A label that arrives on an expired lease is
stored only if it can take a free slot again; otherwise it is refused (``Conflict``) and nothing is
counted. Someone whose lease expired may be handed the same item again later (the same assignment,
renewed).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from alignloop.feedback.db import (
    DEFAULT_LEASE_MINUTES,
    FLAG_KINDS,
    Assignment,
    Candidate,
    Comparison,
    Flag,
    Label,
    Prompt,
    Rating,
    Review,
    Round,
    User,
    utcnow,
)
from alignloop.stats import win_rate

MAX_PROMPT_CHARS = 20_000
MAX_RESPONSE_CHARS = 50_000
MAX_COMMENT_CHARS = 2_000
MAX_CRITERIA = 10
MAX_LEASE_MINUTES = 7 * 24 * 60
MAX_MESSAGES = 200
MESSAGE_ROLES = ("system", "user", "assistant", "tool")


class NotFound(Exception):
    pass


class Forbidden(Exception):
    pass


class Invalid(Exception):
    pass


class Conflict(Exception):
    """The request was valid but the state has moved on (a label on an expired lease of a full item)."""


# ---------------------------------------------------------------- rounds and prompts


def check_criteria(criteria: list[dict]) -> list[dict]:
    if not 1 <= len(criteria) <= MAX_CRITERIA:
        raise Invalid(f"criteria: give 1 to {MAX_CRITERIA} criteria")
    out = []
    for i, c in enumerate(criteria):
        name = str(c.get("name", ""))
        if not name or len(name) > 64 or not all(ch.isalnum() or ch == "_" for ch in name):
            raise Invalid(f"criteria[{i}].name: 1-64 letters, digits or '_'")
        lo, hi = c.get("min", 1), c.get("max", 7)
        if not (isinstance(lo, int) and isinstance(hi, int) and lo < hi and hi - lo <= 100):
            raise Invalid(f"criteria[{i}]: min and max must be integers with min < max")
        out.append({"name": name, "min": lo, "max": hi, "guideline": str(c.get("guideline", ""))[:2000]})
    if len({c["name"] for c in out}) != len(out):
        raise Invalid("criteria: names must be unique")
    return out


def create_round(db: Session, name: str, criteria: list[dict], guidelines: str = "", overlap: int = 1,
                 lease_minutes: int = DEFAULT_LEASE_MINUTES) -> Round:
    if not name or len(name) > 100:
        raise Invalid("name: 1 to 100 characters")
    if not 1 <= overlap <= 50:
        raise Invalid("overlap: between 1 and 50")
    if not 1 <= lease_minutes <= MAX_LEASE_MINUTES:
        raise Invalid(f"lease_minutes: between 1 and {MAX_LEASE_MINUTES} (a week)")
    if db.scalar(select(Round).where(Round.name == name)) is not None:
        raise Invalid(f"round {name!r} already exists")
    rnd = Round(name=name, criteria=check_criteria(criteria), guidelines=guidelines[:20_000], overlap=overlap,
                lease_minutes=lease_minutes)
    db.add(rnd)
    db.commit()
    return rnd


def get_round(db: Session, name: str) -> Round:
    rnd = db.scalar(select(Round).where(Round.name == name))
    if rnd is None:
        raise NotFound(f"no round named {name!r}")
    return rnd


def list_rounds(db: Session) -> list[Round]:
    return list(db.scalars(select(Round).order_by(Round.id)))


def check_messages(n: int, messages: Any) -> list[dict[str, str]] | None:
    """A chat prompt's messages as stored: [{"role", "content"}], or None for a plain prompt."""
    if messages is None:
        return None
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        raise Invalid(f"item {n}: 'messages' must be a list of 1 to {MAX_MESSAGES} messages")
    out = []
    for m in messages:
        if not (isinstance(m, dict) and m.get("role") in MESSAGE_ROLES and isinstance(m.get("content"), str)):
            raise Invalid(f"item {n}: each message needs a 'role' in {MESSAGE_ROLES} and text 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    if sum(len(m["content"]) for m in out) > MAX_PROMPT_CHARS:
        raise Invalid(f"item {n}: 'messages' hold more than {MAX_PROMPT_CHARS} characters")
    return out


def add_items(db: Session, rnd: Round, items: list[dict], kind: str = "candidate") -> int:
    """Add prompts with their responses. Each item: {"prompt", "responses": [...] or [{"text", "model",
    "generation"}], optional "gold_ranking": [indices best..worst]}; policy samples may also be PPO
    ``samples.jsonl`` lines ({"prompt", "response", "step"}). A chat prompt also carries its "messages"
    (exports then give the prompt as messages); "prompt" is what annotators see. Returns the number of
    prompts."""
    for n, item in enumerate(items):
        prompt = item.get("prompt")
        if not isinstance(prompt, str) or not prompt or len(prompt) > MAX_PROMPT_CHARS:
            raise Invalid(f"item {n}: 'prompt' must be text of 1 to {MAX_PROMPT_CHARS} characters")
        messages = check_messages(n, item.get("messages"))
        responses = item.get("responses", [])
        if kind == "policy" and "responses" not in item and isinstance(item.get("response"), str):
            # A PPO run's samples.jsonl line: {"step", "prompt", "response", ...}.
            step = item.get("step")
            responses = [{"text": item["response"], "model": item.get("model") or (f"ppo-step-{step}" if step else "")}]
        if not isinstance(responses, list) or len(responses) > 16:
            raise Invalid(f"item {n}: 'responses' must be a list of at most 16")
        if kind == "candidate" and len(responses) < 2:
            raise Invalid(f"item {n}: 'responses' needs at least 2 candidates to rank")
        cands = []
        for r in responses:
            r = {"text": r} if isinstance(r, str) else r
            text = r.get("text") if isinstance(r, dict) else None
            if not isinstance(text, str) or len(text) > MAX_RESPONSE_CHARS:
                raise Invalid(f"item {n}: each response must be text of at most {MAX_RESPONSE_CHARS} characters")
            cands.append(Candidate(text=text, model=str(r.get("model", ""))[:255], kind=kind,
                                   generation=r.get("generation") or {}))
        gold = item.get("gold_ranking")
        if gold is not None and sorted(gold) != list(range(len(cands))):
            raise Invalid(f"item {n}: 'gold_ranking' must list each response index once")
        p = Prompt(round_id=rnd.id, text=prompt, messages=messages, candidates=cands)
        db.add(p)
        if gold is not None:
            db.flush()
            p.gold_ranking = [cands[i].id for i in gold]
    db.commit()
    return len(items)


# ---------------------------------------------------------------- labelling queue


def task_view(a: Assignment, rnd: Round) -> dict[str, Any]:
    by_id = {c.id: c for c in a.prompt.candidates}
    lease_end = a.lease_expires_at.replace(tzinfo=dt.timezone.utc) if a.lease_expires_at is not None else None
    return {"task_id": a.id, "round": rnd.name, "status": a.status, "lease_expires_at": lease_end,
            "prompt": a.prompt.text,
            "candidates": [{"id": cid, "text": by_id[cid].text} for cid in a.order],
            "criteria": rnd.criteria, "guidelines": rnd.guidelines, "flag_kinds": list(FLAG_KINDS)}


def open_assignment(db: Session, user: User, rnd: Round) -> Assignment | None:
    return db.scalar(select(Assignment).join(Prompt).where(
        Prompt.round_id == rnd.id, Assignment.user_id == user.id, Assignment.status == "open"
    ).order_by(Assignment.id).limit(1))


def expire_leases(db: Session, rnd: Round, now: dt.datetime) -> int:
    """Expire the round's open assignments whose lease ran out and give their slots back; commits when it
    expired any. Returns how many expired here (a concurrent request may expire some first; each is counted
    once)."""
    due = db.execute(select(Assignment.id, Assignment.prompt_id).join(Prompt).where(
        Prompt.round_id == rnd.id, Assignment.status == "open", Assignment.lease_expires_at < now)).all()
    expired = 0
    for aid, pid in due:
        took = db.execute(update(Assignment).where(Assignment.id == aid, Assignment.status == "open")
                          .values(status="expired"))
        if took.rowcount == 1:
            db.execute(update(Prompt).where(Prompt.id == pid).values(assigned=Prompt.assigned - 1))
            expired += 1
    if expired:
        db.commit()
    return expired


def _user_item_hash(user: User, prompt_id: int) -> int:
    """A fixed pseudo-random number per (user, item): each user's own order of the queue and of an item's
    candidates, the same on every run (so a seeded simulation labels the same way every time)."""
    digest = hashlib.blake2b(f"{user.id}:{prompt_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def next_task(db: Session, user: User, rnd: Round, now: dt.datetime | None = None) -> Assignment | None:
    """The user's open task in this round, else a newly assigned item with a free slot, else None.
    Expired leases of the round go back to the queue first."""
    now = now or utcnow()
    expire_leases(db, rnd, now)
    current = open_assignment(db, user, rnd)
    if current is not None:
        return current
    # Items the user holds or has finished; an item whose lease they let expire may come back to them.
    mine = select(Assignment.prompt_id).where(Assignment.user_id == user.id, Assignment.status != "expired")
    has_candidates = select(Candidate.prompt_id).where(Candidate.kind == "candidate")
    # Concurrent requests race for the same free slots; a lost race just means looking again. Only an
    # empty query result means the queue is really empty for this user.
    for _attempt in range(50):
        # Fill items that already have labels first, so overlapping items complete and agreement can be
        # measured; within equal fill each user goes through the items in an order of their own, so
        # concurrent requests mostly try different items.
        rows = db.execute(select(Prompt.id, Prompt.assigned).where(
            Prompt.round_id == rnd.id, Prompt.assigned < rnd.overlap, Prompt.id.not_in(mine),
            Prompt.id.in_(has_candidates),
        ).order_by(Prompt.assigned.desc(), Prompt.id).limit(50)).all()
        if not rows:
            break
        pids = sorted(rows, key=lambda r: (-r.assigned, _user_item_hash(user, r.id)))
        for pid, _ in pids:
            took = db.execute(update(Prompt).where(Prompt.id == pid, Prompt.assigned < rnd.overlap)
                              .values(assigned=Prompt.assigned + 1))
            if took.rowcount == 1:
                return _assign(db, user, rnd, pid, now)
        db.rollback()
    db.rollback()
    return None


def _assign(db: Session, user: User, rnd: Round, pid: int, now: dt.datetime) -> Assignment | None:
    """Hand item ``pid`` (whose slot the caller has just taken, uncommitted) to ``user``."""
    lease_end = now + dt.timedelta(minutes=rnd.lease_minutes)
    lapsed = db.scalar(select(Assignment).where(Assignment.prompt_id == pid, Assignment.user_id == user.id))
    if lapsed is not None:
        # The user's own expired assignment of this item: renewed, candidates in the order shown before.
        renewed = db.execute(update(Assignment).where(Assignment.id == lapsed.id, Assignment.status == "expired")
                             .values(status="open", lease_expires_at=lease_end))
        if renewed.rowcount != 1:  # the same user asked twice at once; the other request renewed it
            db.rollback()
            return open_assignment(db, user, rnd)
        db.commit()
        db.refresh(lapsed)
        return lapsed
    prompt = db.get(Prompt, pid)
    order = [c.id for c in prompt.candidates if c.kind == "candidate"]
    # Shown in an order of the user's own, so position in the list says nothing about the candidate.
    random.Random(_user_item_hash(user, pid)).shuffle(order)
    a = Assignment(prompt_id=pid, user_id=user.id, order=order, lease_expires_at=lease_end)
    db.add(a)
    try:
        db.commit()
    except IntegrityError:  # the same user asked twice at once; the other request got this item
        db.rollback()
        return open_assignment(db, user, rnd)
    return a


def owned_assignment(db: Session, user: User, task_id: int) -> Assignment:
    a = db.get(Assignment, task_id)
    if a is None:
        raise NotFound(f"no task {task_id}")
    if a.user_id != user.id:
        raise Forbidden("this task is assigned to someone else")
    return a


def _check_label(a: Assignment, rnd: Round, payload: dict) -> tuple[list[int], list[Rating], list[Flag]]:
    ids = set(a.order)
    ranking = [int(x) for x in payload.get("ranking") or []]
    if sorted(ranking) != sorted(ids):
        raise Invalid("ranking: must list every candidate id of the task exactly once, best first")
    scales = {c["name"]: c for c in rnd.criteria}
    ratings = []
    for cid, scores in (payload.get("ratings") or {}).items():
        cid = int(cid)
        if cid not in ids:
            raise Invalid(f"ratings: candidate {cid} is not part of this task")
        for crit, value in scores.items():
            scale = scales.get(crit)
            if scale is None:
                raise Invalid(f"ratings: unknown criterion {crit!r} (round has {', '.join(scales)})")
            if not isinstance(value, int | float) or not scale["min"] <= value <= scale["max"]:
                raise Invalid(f"ratings: {crit} must be between {scale['min']} and {scale['max']}")
            ratings.append(Rating(candidate_id=cid, criterion=crit, value=float(value)))
    flags = []
    for f in payload.get("flags") or []:
        if int(f.get("candidate_id", -1)) not in ids or f.get("kind") not in FLAG_KINDS:
            raise Invalid(f"flags: each flag needs a candidate_id of this task and a kind in {FLAG_KINDS}")
        flags.append(Flag(candidate_id=int(f["candidate_id"]), kind=f["kind"]))
    return ranking, ratings, flags


def submit_label(db: Session, user: User, task_id: int, payload: dict) -> tuple[Label, bool]:
    """Store the label (or the skip) and commit. Returns (label, created); resubmitting a finished task
    returns its stored label unchanged, so a client may safely retry after a lost answer. A label on an
    expired lease is stored only if the item still has a free slot (it takes it), else Conflict; one whose
    lease ran out but was not expired yet still holds its slot and is stored."""
    a = owned_assignment(db, user, task_id)
    existing = db.scalar(select(Label).where(Label.assignment_id == a.id))
    if existing is not None:
        return existing, False
    rnd = a.prompt.round
    comment = str(payload.get("comment") or "")
    if len(comment) > MAX_COMMENT_CHARS:
        raise Invalid(f"comment: at most {MAX_COMMENT_CHARS} characters")
    skip = bool(payload.get("skip"))
    if skip:
        label = Label(assignment_id=a.id, prompt_id=a.prompt_id, user_id=user.id, skipped=True, comment=comment)
    else:
        ranking, ratings, flags = _check_label(a, rnd, payload)
        label = Label(assignment_id=a.id, prompt_id=a.prompt_id, user_id=user.id, ranking=ranking,
                      comment=comment, ratings=ratings, flags=flags)
    status = "skipped" if skip else "done"
    # Closing the assignment is one conditional UPDATE, so a lease expiring at the same moment and this
    # label cannot both act on the slot.
    if _close(db, a, "open", status):
        if skip:  # give the slot back so someone else can label the item
            db.execute(update(Prompt).where(Prompt.id == a.prompt_id).values(assigned=Prompt.assigned - 1))
    elif a.status == "expired":
        # The slot went back to the queue. A skip needs none; a label must take a free one again.
        if not skip:
            took = db.execute(update(Prompt).where(Prompt.id == a.prompt_id, Prompt.assigned < rnd.overlap)
                              .values(assigned=Prompt.assigned + 1))
            if took.rowcount != 1:
                db.rollback()
                raise Conflict(f"task {task_id}: your lease ran out ({rnd.lease_minutes} minutes) and the item "
                               "has since been given to others; this label was not stored. Take the next task.")
        if not _close(db, a, "expired", status):
            db.rollback()
            return _stored_label(db, a), False
    else:  # a concurrent retry of the same submit closed it first
        db.rollback()
        return _stored_label(db, a), False
    db.add(label)
    try:
        db.commit()
    except IntegrityError:  # a concurrent retry of the same submit won
        db.rollback()
        return _stored_label(db, a), False
    return label, True


def _close(db: Session, a: Assignment, was: str, status: str) -> bool:
    """Set the assignment's status from ``was`` to ``status`` if it still is ``was``; else reload it."""
    done = db.execute(update(Assignment).where(Assignment.id == a.id, Assignment.status == was)
                      .values(status=status)).rowcount == 1
    db.refresh(a)
    return done


def _stored_label(db: Session, a: Assignment) -> Label:
    return db.scalar(select(Label).where(Label.assignment_id == a.id))


def user_progress(db: Session, user: User, rnd: Round) -> dict[str, int]:
    done = db.scalar(select(func.count(Label.id)).join(Prompt).where(
        Prompt.round_id == rnd.id, Label.user_id == user.id, Label.skipped.is_(False))) or 0
    skipped = db.scalar(select(func.count(Label.id)).join(Prompt).where(
        Prompt.round_id == rnd.id, Label.user_id == user.id, Label.skipped.is_(True))) or 0
    total = db.scalar(select(func.count(Prompt.id)).where(Prompt.round_id == rnd.id)) or 0
    return {"done": done, "skipped": skipped, "items": total}


def round_progress(db: Session, rnd: Round) -> dict[str, Any]:
    items = db.scalar(select(func.count(Prompt.id)).where(Prompt.round_id == rnd.id)) or 0
    rows = db.execute(select(User.username, Label.skipped, func.count(Label.id)).join(Label.user).join(Prompt)
                      .where(Prompt.round_id == rnd.id).group_by(User.username, Label.skipped)).all()
    per_user: dict[str, dict[str, int]] = {}
    for name, skipped, n in rows:
        per_user.setdefault(name, {"done": 0, "skipped": 0})["skipped" if skipped else "done"] += n
    done = sum(u["done"] for u in per_user.values())
    policy = db.scalar(select(func.count(Candidate.id)).join(Prompt).where(
        Prompt.round_id == rnd.id, Candidate.kind == "policy")) or 0
    reviews = db.scalar(select(func.count(Review.id)).join(Candidate).join(Prompt).where(
        Prompt.round_id == rnd.id)) or 0
    return {"round": rnd.name, "items": items, "overlap": rnd.overlap, "slots": items * rnd.overlap,
            "labels": done, "per_annotator": per_user, "policy_samples": policy, "reviews": reviews}


# ---------------------------------------------------------------- review queue (policy samples)


def next_review(db: Session, user: User, rnd: Round) -> Candidate | None:
    reviewed = select(Review.candidate_id).where(Review.user_id == user.id)
    counts = (select(Review.candidate_id, func.count(Review.id).label("n")).group_by(Review.candidate_id)
              .subquery())
    return db.scalar(select(Candidate).join(Prompt).outerjoin(counts, counts.c.candidate_id == Candidate.id)
                     .where(Prompt.round_id == rnd.id, Candidate.kind == "policy",
                            Candidate.id.not_in(reviewed), func.coalesce(counts.c.n, 0) < rnd.overlap)
                     .order_by(Candidate.id).limit(1))


def submit_review(db: Session, user: User, candidate_id: int, decision: str, reason: str = "") -> Review:
    cand = db.get(Candidate, candidate_id)
    if cand is None or cand.kind != "policy":
        raise NotFound(f"no policy sample {candidate_id}")
    if decision not in ("approve", "flag"):
        raise Invalid("decision: 'approve' or 'flag'")
    if decision == "flag" and not reason.strip():
        raise Invalid("reason: say why the sample is flagged")
    if len(reason) > MAX_COMMENT_CHARS:
        raise Invalid(f"reason: at most {MAX_COMMENT_CHARS} characters")
    existing = db.scalar(select(Review).where(Review.candidate_id == cand.id, Review.user_id == user.id))
    if existing is not None:
        return existing
    review = Review(candidate_id=cand.id, user_id=user.id, decision=decision, reason=reason)
    db.add(review)
    db.commit()
    return review


# ---------------------------------------------------------------- blind side-by-side


def round_models(db: Session, rnd: Round) -> list[str]:
    return sorted(db.scalars(select(Candidate.model).join(Prompt).where(Prompt.round_id == rnd.id)
                             .distinct()).all())


def next_comparison(db: Session, user: User, rnd: Round, model_a: str, model_b: str) -> Comparison | None:
    """A prompt answered by both models that this user has not judged for this pair, shown in random
    order; the names stay hidden until the vote is in."""
    if model_a == model_b:
        raise Invalid("choose two different models")
    pending = db.scalar(select(Comparison).join(Prompt).where(
        Prompt.round_id == rnd.id, Comparison.user_id == user.id, Comparison.winner.is_(None),
        Comparison.model_a == model_a, Comparison.model_b == model_b).limit(1))
    if pending is not None:
        return pending
    done = select(Comparison.prompt_id).where(Comparison.user_id == user.id, Comparison.model_a == model_a,
                                              Comparison.model_b == model_b)
    for prompt in db.scalars(select(Prompt).where(Prompt.round_id == rnd.id, Prompt.id.not_in(done))
                             .order_by(Prompt.id)):
        a = next((c for c in prompt.candidates if c.model == model_a), None)
        b = next((c for c in prompt.candidates if c.model == model_b), None)
        if a is None or b is None:
            continue
        left, right = (a, b) if random.random() < 0.5 else (b, a)
        comp = Comparison(prompt_id=prompt.id, user_id=user.id, left_id=left.id, right_id=right.id,
                          model_a=model_a, model_b=model_b)
        db.add(comp)
        db.commit()
        return comp
    return None


def vote(db: Session, user: User, comparison_id: int, winner: str) -> Comparison:
    comp = db.get(Comparison, comparison_id)
    if comp is None:
        raise NotFound(f"no comparison {comparison_id}")
    if comp.user_id != user.id:
        raise Forbidden("this comparison belongs to someone else")
    if winner not in ("left", "right", "tie"):
        raise Invalid("winner: 'left', 'right' or 'tie'")
    if comp.winner is None:
        comp.winner = winner
        db.commit()
    return comp


def win_rates(db: Session, rnd: Round) -> list[dict[str, Any]]:
    """Per model pair: model_a's win rate (a tie counts half) with a 95% Wilson interval."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    rows = db.execute(select(Comparison, Candidate.model).join(Prompt, Prompt.id == Comparison.prompt_id)
                      .join(Candidate, Candidate.id == Comparison.left_id)
                      .where(Prompt.round_id == rnd.id, Comparison.winner.is_not(None))).all()
    for comp, left_model in rows:
        s = out.setdefault((comp.model_a, comp.model_b), {"model_a": comp.model_a, "model_b": comp.model_b,
                                                          "a_wins": 0, "b_wins": 0, "ties": 0})
        if comp.winner == "tie":
            s["ties"] += 1
        elif (comp.winner == "left") == (left_model == comp.model_a):
            s["a_wins"] += 1
        else:
            s["b_wins"] += 1
    for s in out.values():
        rate = win_rate(s["a_wins"], s["ties"], s["b_wins"])
        s.update(n=rate.n, win_rate=rate.win_rate, ci_low=rate.ci_low, ci_high=rate.ci_high)
    return list(out.values())
