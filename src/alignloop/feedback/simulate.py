"""Simulated annotators at work: each logs in and labels through the same HTTP API as people do.

Who they are and how they judge (gold scores seen through their bias and noise) is
``alignloop.data.synthetic.Annotator``; an ``AnnotatorClient`` takes tasks from the labelling app as
that annotator and submits their judgement. The demo and the tests use them to fill a round; the
reward model only ever sees what they submit.

    people = [AnnotatorClient(url, password, a) for a in make_annotators(["sim1", "sim2"], gold, noise=0.5)]
    run_annotators(people, "round-1", max_labels=50)
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

from alignloop.data.synthetic import Annotator


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
        r = self.client.post("/api/login", json={"username": self.username, "password": self.password})
        r.raise_for_status()
        self.token = r.json()["token"]
        self.client.headers["Authorization"] = f"Bearer {self.token}"

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
