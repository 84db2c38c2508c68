"""Simulated people at work: each logs in and works through the same HTTP API as people do.

Who an annotator is and how they judge (gold scores seen through their bias and noise) is
``alignloop.data.synthetic.Annotator``; an ``AnnotatorClient`` takes tasks from the labelling app as
that annotator and submits their judgement. A ``ReviewerClient`` approves or flags the policy samples of
a round's review queue. The demo, the pipeline and the tests use them to fill a round; the reward model
only ever sees what they submit. ``SimulatedAnnotation`` holds the settings of a simulated round
(``alignloop.feedback.rounds.simulate_round`` runs one).

    people = [AnnotatorClient(url, password, a) for a in make_annotators(["sim1", "sim2"], gold, noise=0.5)]
    run_annotators(people, "round-1", max_labels=50)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
from pydantic import Field

from alignloop.config import Strict
from alignloop.data.synthetic import GOLD_WEIGHTS, Annotator


class SimulatedAnnotation(Strict):
    """Simulated people: ``gold(prompt, response) -> {criterion: rating}`` seen through per-person bias
    and noise. Reviewers approve a PPO sample when its gold total is at least ``approve_at``."""

    gold: str = "alignloop.data.synthetic:gold_ratings"
    gold_total: str = "alignloop.data.synthetic:gold_total"
    annotators: int = Field(3, gt=0)
    reviewers: int = Field(1, ge=0)
    noise: float = Field(0.5, ge=0)
    bias_scale: float = Field(0.3, ge=0)
    # How the annotators weigh the criteria when they rank: as gold_total does (the default gold's weights),
    # so that their judgement is the gold score plus noise and bias. null = equally.
    weights: dict[str, float] | None = Field(default_factory=lambda: dict(GOLD_WEIGHTS))
    review_samples: int = Field(16, ge=0)  # of the previous round's PPO samples, shown to reviewers
    approve_at: float = Field(0.6, ge=0, le=1)
    # Extra prompts per round whose candidates nobody labels: ordered by gold_total instead, they are the
    # reward model's test set (accuracy against the gold preferences, on what the current policy writes).
    gold_test_prompts: int = Field(0, ge=0)


def log_in(client: httpx.Client, username: str, password: str) -> str:
    """Log ``client`` in through the API; its later requests carry the bearer token, which is returned."""
    r = client.post("/api/login", json={"username": username, "password": password})
    r.raise_for_status()
    token = r.json()["token"]
    client.headers["Authorization"] = f"Bearer {token}"
    return token


@dataclass
class AnnotatorClient:
    """Labels as ``annotator`` through the app's HTTP API (logging in with their name and ``password``)."""

    base_url: str
    password: str
    annotator: Annotator
    timeout: float = 30.0
    token: str | None = None
    labelled: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.base_url, timeout=self.timeout)

    @property
    def username(self) -> str:
        return self.annotator.name

    def login(self) -> None:
        self.token = log_in(self.client, self.username, self.password)

    def label_payload(self, task: dict) -> dict:
        """The label the annotator submits for one task (as the API hands it out): ranking and ratings
        by candidate id, or a skip."""
        scales = {c["name"]: (c["min"], c["max"]) for c in task["criteria"]}
        ids = [cand["id"] for cand in task["candidates"]]
        judgement = self.annotator.judge(task["prompt"], [cand["text"] for cand in task["candidates"]], scales)
        if judgement is None:
            return {"skip": True}
        return {"ranking": [ids[i] for i in judgement.ranking],
                "ratings": dict(zip(ids, judgement.ratings, strict=True))}

    def run(self, round_name: str, max_labels: int) -> int:
        """Label until ``max_labels`` are submitted or the queue is empty; returns how many were submitted."""
        return sum(1 for _ in self.labels(round_name, max_labels))

    def labels(self, round_name: str, max_labels: int) -> Iterator[int]:
        """Label one task per iteration (yielding its id) until ``max_labels`` or the queue is empty."""
        if self.token is None:
            self.login()
        r = self.client.post(f"/api/rounds/{round_name}/next")
        r.raise_for_status()
        task = r.json() if r.status_code == 200 else None
        n = 0
        while task is not None and n < max_labels:
            more = "?next=true" if n + 1 < max_labels else ""
            r = self.client.post(f"/api/tasks/{task['task_id']}/label{more}", json=self.label_payload(task))
            r.raise_for_status()
            self.labelled.append(task["task_id"])
            n += 1
            yield task["task_id"]
            task = r.json().get("next")


def run_annotators(annotators: list[AnnotatorClient], round_name: str, max_labels: int,
                   concurrent: bool = True) -> dict[str, int]:
    """Run the annotators until each did ``max_labels`` or the queue is empty: concurrently (one thread
    each, as people work), or taking turns one label at a time, so that who labels which task, and so every
    label of a seeded run, is the same on every run."""
    if not concurrent:
        done = dict.fromkeys((a.username for a in annotators), 0)
        turns = {a.username: a.labels(round_name, max_labels) for a in annotators}
        while turns:
            for name in list(turns):
                if next(turns[name], None) is None:
                    del turns[name]
                else:
                    done[name] += 1
        return done

    finished: dict[str, int] = {}
    errors: list[BaseException] = []

    def work(a: AnnotatorClient) -> None:
        try:
            finished[a.username] = a.run(round_name, max_labels)
        except BaseException as exc:  # surfaced below, after every thread stopped
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(a,), daemon=True) for a in annotators]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return finished


@dataclass
class ReviewerClient:
    """Reviews a round's policy samples as ``username`` through the app's HTTP API: approves a sample when
    ``approve(prompt, response)`` holds, flags it otherwise."""

    base_url: str
    username: str
    password: str
    approve: Callable[[str, str], bool]
    timeout: float = 30.0

    def run(self, round_name: str) -> int:
        """Review until the round's review queue is empty; returns how many samples were reviewed."""
        with httpx.Client(base_url=self.base_url, timeout=self.timeout) as client:
            log_in(client, self.username, self.password)
            n = 0
            while (r := client.post(f"/api/rounds/{round_name}/review/next")).status_code == 200:
                sample = r.json()
                body = ({"decision": "approve"} if self.approve(sample["prompt"], sample["response"])
                        else {"decision": "flag", "reason": "below the reviewer's bar"})
                client.post(f"/api/reviews/{sample['sample_id']}", json=body).raise_for_status()
                n += 1
            r.raise_for_status()
        return n
