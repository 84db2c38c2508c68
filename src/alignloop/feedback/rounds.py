"""The feedback layer's public face for the pipeline: rounds by database URL and name, their progress, the
export of every round so far into reward-model training records, policy samples for the review queue, and
a simulated round (annotators and reviewers working through the app's HTTP API).

Each call opens the database itself, so a caller needs nothing of the feedback layer but these functions.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import Counter
from typing import Any

from alignloop.data.synthetic import make_annotators
from alignloop.errors import UserError
from alignloop.feedback import admin, tasks
from alignloop.feedback.db import open_db
from alignloop.feedback.export import export_records
from alignloop.feedback.simulate import AnnotatorClient, ReviewerClient, SimulatedAnnotation, run_annotators
from alignloop.feedback.web.server import FeedbackServer
from alignloop.rl.rewards import import_callable

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 999  # of one round number: round-N, round-N.2, ... round-N.999


def fresh_round_name(db_url: str, n: int) -> str:
    """``round-N``, or ``round-N.2``, ``round-N.3``, ... : the first name not yet in the database, so that a
    rerun of a round never appends to an older attempt of it."""
    with open_db(db_url)() as db:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            name = f"round-{n}" if attempt == 1 else f"round-{n}.{attempt}"
            try:
                tasks.get_round(db, name)
            except tasks.NotFound:
                return name
    raise UserError(f"{db_url}: too many attempts of round {n}")


def round_progress(db_url: str, round_name: str) -> dict[str, Any]:
    """The round's counts (``labels``, ``policy_samples``, ...), as the app's admin page shows them."""
    with open_db(db_url)() as db:
        return tasks.round_progress(db, tasks.get_round(db, round_name))


def export_rounds(db_url: str, round_names: list[str]) -> list[dict[str, Any]]:
    """Reward-model training records of the rounds, in order: each round's rankings (reviews of policy
    samples included) and then the ratings of each response; both train the reward model."""
    records: list[dict[str, Any]] = []
    with open_db(db_url)() as db:
        for name in round_names:
            rnd = tasks.get_round(db, name)
            records += export_records(db, rnd, "rankings") + export_records(db, rnd, "ratings")
    return records


def add_policy_samples(db_url: str, round_name: str, samples: list[dict], limit: int) -> int:
    """Up to ``limit`` of a policy's ``samples`` (``{"prompt", "response"}`` in the order they were written)
    into the round's review queue, latest first, preferring prompts that were sampled more than once:
    reviews of two samples of one prompt become a training pair. A round that already has policy samples
    (a rerun) gets none added. Returns how many samples were chosen."""
    latest_first = samples[::-1]
    seen = Counter(s["prompt"] for s in latest_first)
    chosen = sorted(latest_first, key=lambda s: seen[s["prompt"]] < 2)[:limit]
    if not chosen:
        return 0
    with open_db(db_url)() as db:
        rnd = tasks.get_round(db, round_name)
        if tasks.round_progress(db, rnd)["policy_samples"] == 0:
            tasks.add_items(db, rnd, chosen, kind="policy")
    return len(chosen)


def simulated_users(db_url: str, roles: dict[str, str]) -> str:
    """Create the simulated users (username -> role) or re-key those that exist; returns the password they
    share from now on (a fresh random one on every call)."""
    password = secrets.token_urlsafe(18)
    admin.set_up_users(db_url, roles, password)
    return password


def simulate_round(db_url: str, round_name: str, quota: int, settings: SimulatedAnnotation, seed: int,
                   policy_samples: list[dict] | None = None) -> dict[str, int]:
    """Simulated people fill the round through the app's HTTP API (served here on loopback): the annotators
    ``sim-annotator-1..N`` take turns until together they submitted ``quota`` labels (or the queue is empty);
    given ``policy_samples``, up to ``settings.review_samples`` of them join the review queue and the
    reviewers ``sim-reviewer-1..M`` review it. ``seed`` draws the annotators' biases and noise. Returns how
    many labels or reviews each person submitted."""
    annotators = [f"sim-annotator-{i + 1}" for i in range(settings.annotators)]
    reviewers = [f"sim-reviewer-{i + 1}" for i in range(settings.reviewers)] if policy_samples is not None else []
    password = simulated_users(db_url, {**dict.fromkeys(annotators, "annotator"),
                                        **dict.fromkeys(reviewers, "reviewer")})
    if reviewers:
        add_policy_samples(db_url, round_name, policy_samples, settings.review_samples)
    gold, total = import_callable(settings.gold), import_callable(settings.gold_total)

    def approve(prompt: str, response: str) -> bool:
        return total(prompt, response) >= settings.approve_at

    with FeedbackServer(db_url) as server:
        people = [AnnotatorClient(server.url, password, a)
                  for a in make_annotators(annotators, gold, noise=settings.noise, bias_scale=settings.bias_scale,
                                           seed=seed, weights=settings.weights)]
        # In turn, not in threads: who labels which task then does not depend on timing, so a seeded run
        # gets the same labels every time (with threads, two runs of one seed ranked most items differently).
        done = run_annotators(people, round_name, max_labels=math.ceil(quota / len(people)), concurrent=False)
        for name in reviewers:
            done[name] = ReviewerClient(server.url, name, password, approve).run(round_name)
    log.info("%s: simulated labels and reviews %s", round_name, done)
    return done
