"""Simulated annotators: they log in and label through the same HTTP API as people do.

Each annotator judges with a hidden gold scoring function ``gold(prompt, response) -> {criterion:
score}`` plus its own per-criterion bias and Gaussian noise. The noisy scores give the ratings
(rounded and clipped to the round's scales) and, weighted over criteria (``weights``; equally when
not given), the ranking. The demo and the tests use them to fill a round; the reward model only ever
sees what they submit.

    annotators = make_annotators(url, ["sim1", "sim2"], password="...", gold=my_gold, noise=0.5)
    run_annotators(annotators, "round-1", max_labels=50)
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx

from alignloop.errors import UserError

GoldFn = Callable[[str, str], dict[str, float]]


@dataclass
class SimulatedAnnotator:
    base_url: str
    username: str
    password: str
    gold: GoldFn
    noise: float = 0.5
    # Per-criterion bias: given, or drawn once per criterion from N(0, bias_scale) on first use.
    bias: dict[str, float] = field(default_factory=dict)
    bias_scale: float = 0.0
    # How much each criterion counts in the overall judgement that orders the candidates; None = equally.
    weights: dict[str, float] | None = None
    seed: int = 0
    skip_rate: float = 0.0
    timeout: float = 30.0
    token: str | None = None
    labelled: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.client = httpx.Client(base_url=self.base_url, timeout=self.timeout)

    def login(self) -> None:
        r = self.client.post("/api/login", json={"username": self.username, "password": self.password})
        r.raise_for_status()
        self.token = r.json()["token"]
        self.client.headers["Authorization"] = f"Bearer {self.token}"

    def judge(self, task: dict) -> dict:
        """The label payload for one task: noisy, biased gold scores -> ratings and ranking."""
        if self.skip_rate and self.rng.random() < self.skip_rate:
            return {"skip": True}
        scales = {c["name"]: c for c in task["criteria"]}
        noisy: dict[int, dict[str, float]] = {}
        for cand in task["candidates"]:
            gold = self.gold(task["prompt"], cand["text"])
            for k in gold:
                if k not in self.bias:
                    self.bias[k] = self.rng.gauss(0.0, self.bias_scale)
            noisy[cand["id"]] = {k: v + self.bias[k] + self.rng.gauss(0.0, self.noise)
                                 for k, v in gold.items() if k in scales}
        ranking = sorted(noisy, key=lambda cid: -self.overall(noisy[cid]))
        ratings = {cid: {k: float(min(scales[k]["max"], max(scales[k]["min"], round(v)))) for k, v in s.items()}
                   for cid, s in noisy.items()}
        return {"ranking": ranking, "ratings": ratings}

    def overall(self, scores: dict[str, float]) -> float:
        weights = self.weights or dict.fromkeys(scores, 1.0)
        missing = sorted(set(scores) - set(weights))
        if missing:
            raise UserError(f"simulated annotator weights {weights} give no weight to criterion {missing[0]!r}")
        return sum(weights[k] * v for k, v in scores.items()) / (sum(weights[k] for k in scores) or 1.0)

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
            r = self.client.post(f"/api/tasks/{task['task_id']}/label{more}", json=self.judge(task))
            r.raise_for_status()
            self.labelled.append(task["task_id"])
            n += 1
            yield task["task_id"]
            task = r.json().get("next")


def make_annotators(base_url: str, usernames: list[str], password: str, gold: GoldFn, noise: float = 0.5,
                    bias_scale: float = 0.5, seed: int = 0, skip_rate: float = 0.0,
                    weights: dict[str, float] | None = None) -> list[SimulatedAnnotator]:
    """One annotator per username, each with its own seeded bias (N(0, bias_scale) per criterion); all rank
    by the same criterion ``weights`` (None = equally)."""
    return [SimulatedAnnotator(base_url, name, password, gold, noise=noise, bias_scale=bias_scale, weights=weights,
                               seed=seed * 1000 + i, skip_rate=skip_rate) for i, name in enumerate(usernames)]


def run_annotators(annotators: list[SimulatedAnnotator], round_name: str, max_labels: int,
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

    def work(a: SimulatedAnnotator) -> None:
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
