"""feedback/rounds.py, the feedback layer's face for the pipeline: fresh round names, the review queue of
policy samples, the simulated users, and a simulated round labelled and reviewed through the HTTP API then
exported as the reward model's training records."""

from __future__ import annotations

import pytest

from alignloop.errors import UserError
from alignloop.feedback import admin, auth, rounds, tasks
from alignloop.feedback.db import Candidate, Review, User, open_db
from alignloop.feedback.simulate import SimulatedAnnotation
from feedback_fixtures import *  # noqa: F403  (fixtures; also selects the cheap argon2 profile)

CRITERIA = ("relevance", "consistency", "creativity")  # the rounds' default criteria


def gold_ratings(prompt: str, response: str) -> dict[str, float]:
    """The tests' hidden judgement: a response with "good" in it is the best on every criterion."""
    return dict.fromkeys(CRITERIA, 7.0 if "good" in response else 1.0)


def gold_total(prompt: str, response: str) -> float:
    return 1.0 if "good" in response else 0.0


# Noise- and bias-free people judging by the functions above, so every label and review is known.
SETTINGS = SimulatedAnnotation(gold="test_feedback_rounds:gold_ratings", gold_total="test_feedback_rounds:gold_total",
                               annotators=2, reviewers=1, noise=0.0, bias_scale=0.0, approve_at=0.6)


def new_round(db_url: str, name: str, n_prompts: int) -> None:
    admin.create_round(db_url, name)
    with open_db(db_url)() as db:
        tasks.add_items(db, tasks.get_round(db, name),
                        [{"prompt": f"P{i}", "responses": [f"bad {i}", f"good {i}"]} for i in range(n_prompts)])


def test_fresh_round_name_is_the_first_attempt_not_in_the_database(fb_db_url):
    assert rounds.fresh_round_name(fb_db_url, 1) == "round-1"
    admin.create_round(fb_db_url, "round-1")
    assert rounds.fresh_round_name(fb_db_url, 1) == "round-1.2"
    admin.create_round(fb_db_url, "round-1.2")
    assert rounds.fresh_round_name(fb_db_url, 1) == "round-1.3"
    assert rounds.fresh_round_name(fb_db_url, 2) == "round-2"


def test_policy_samples_join_the_review_queue_latest_first_repeated_prompts_first_once(fb_db_url):
    admin.create_round(fb_db_url, "r")
    samples = [{"prompt": "p1", "response": "a", "step": 1}, {"prompt": "p2", "response": "b", "step": 1},
               {"prompt": "p1", "response": "c", "step": 2}, {"prompt": "p3", "response": "d", "step": 2},
               {"prompt": "p2", "response": "e", "step": 3}]
    # Latest first: e d c b a; p1 and p2 were sampled twice, p3 once, so d goes last: e c b a d.
    assert rounds.add_policy_samples(fb_db_url, "r", samples, limit=3) == 3
    assert rounds.add_policy_samples(fb_db_url, "r", samples, limit=3) == 3  # a rerun adds nothing
    assert rounds.add_policy_samples(fb_db_url, "r", samples, limit=0) == 0
    with open_db(fb_db_url)() as db:
        queued = db.query(Candidate).filter_by(kind="policy").order_by(Candidate.id).all()
        assert [(c.prompt.text, c.text, c.model) for c in queued] == [
            ("p2", "e", "ppo-step-3"), ("p1", "c", "ppo-step-2"), ("p2", "b", "ppo-step-1")]
    assert rounds.round_progress(fb_db_url, "r")["policy_samples"] == 3


def test_simulated_users_are_created_once_and_re_keyed_on_every_call(fb_db_url):
    first = rounds.simulated_users(fb_db_url, {"sim-a": "annotator", "sim-r": "reviewer"})
    second = rounds.simulated_users(fb_db_url, {"sim-a": "annotator", "sim-r": "reviewer"})
    assert first != second
    with open_db(fb_db_url)() as db:
        assert [(u.username, u.role) for u in auth.list_users(db)] == [("sim-a", "annotator"), ("sim-r", "reviewer")]
        assert auth.authenticate(db, "sim-a", first) is None
        assert auth.authenticate(db, "sim-a", second) is not None


def test_simulate_round_labels_the_quota_and_reviews_through_the_http_api_and_exports_it(fb_db_url):
    new_round(fb_db_url, "round-2", n_prompts=3)
    samples = [{"prompt": "Q", "response": "bad q", "step": 1}, {"prompt": "Q", "response": "good q", "step": 2},
               {"prompt": "R", "response": "good r", "step": 2}]
    # Quota 3 over 2 annotators: up to 2 labels each, so all 3 prompts are labelled.
    done = rounds.simulate_round(fb_db_url, "round-2", 3, SETTINGS, seed=7, policy_samples=samples)
    assert done == {"sim-annotator-1": 2, "sim-annotator-2": 1, "sim-reviewer-1": 3}
    progress = rounds.round_progress(fb_db_url, "round-2")
    assert (progress["labels"], progress["reviews"]) == (3, 3)
    with open_db(fb_db_url)() as db:
        roles = {u.username: u.role for u in db.query(User).all()}
        assert roles == {"sim-annotator-1": "annotator", "sim-annotator-2": "annotator", "sim-reviewer-1": "reviewer"}
        decisions = dict(db.query(Candidate.text, Review.decision).join(Review, Review.candidate_id == Candidate.id))
        assert decisions == {"good q": "approve", "bad q": "flag", "good r": "approve"}

    good, bad = dict.fromkeys(CRITERIA, 7.0), dict.fromkeys(CRITERIA, 1.0)
    labelled = [{"prompt": f"P{i}", "responses": [f"bad {i}", f"good {i}"], "ranking": [1, 0]} for i in range(3)]
    ratings = [r for i in range(3) for r in ({"prompt": f"P{i}", "response": f"bad {i}", "scores": bad},
                                              {"prompt": f"P{i}", "response": f"good {i}", "scores": good})]
    # Only Q has an approved and a flagged sample: one pair; R's single approval pairs with nothing.
    reviewed = [{"prompt": "Q", "responses": ["good q", "bad q"], "ranking": [0, 1], "source": "review"}]
    assert rounds.export_rounds(fb_db_url, ["round-2"]) == labelled + reviewed + ratings


def test_simulate_round_without_policy_samples_has_no_reviewers_and_export_keeps_round_order(fb_db_url):
    new_round(fb_db_url, "a", n_prompts=2)
    new_round(fb_db_url, "b", n_prompts=1)
    assert rounds.simulate_round(fb_db_url, "a", 1, SETTINGS, seed=0) == {"sim-annotator-1": 1, "sim-annotator-2": 1}
    assert rounds.simulate_round(fb_db_url, "b", 5, SETTINGS, seed=0) == {"sim-annotator-1": 1, "sim-annotator-2": 0}
    with open_db(fb_db_url)() as db:
        assert db.query(User).filter_by(role="reviewer").count() == 0
    records = rounds.export_rounds(fb_db_url, ["b", "a"])
    assert [(r["prompt"], "ranking" in r) for r in records] == [
        ("P0", True), ("P0", False), ("P0", False),  # round b: its ranking, then its two responses' ratings
        ("P0", True), ("P1", True), ("P0", False), ("P0", False), ("P1", False), ("P1", False)]
    with pytest.raises(tasks.NotFound):
        rounds.export_rounds(fb_db_url, ["nope"])


def test_too_many_attempts_of_a_round_is_a_user_error(fb_db_url):
    with open_db(fb_db_url)() as db:
        for attempt in range(1, rounds.MAX_ATTEMPTS + 1):
            tasks.create_round(db, "round-3" if attempt == 1 else f"round-3.{attempt}", [{"name": "relevance"}])
    with pytest.raises(UserError, match="too many attempts of round 3"):
        rounds.fresh_round_name(fb_db_url, 3)
