"""The real server process under load, on SQLite and on PostgreSQL: 20 concurrent annotator clients
submit 50 labels each while the server is SIGKILLed once mid-load and restarted. Afterwards every
acknowledged label is in the database, none is duplicated, and no item went to more annotators
than the round's overlap allows."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from sqlalchemy import func, select

from alignloop.feedback import tasks
from alignloop.feedback.db import Assignment, Label, open_db
from feedback_fixtures import *  # noqa: F403  (fixtures)
from feedback_fixtures import PASSWORD, create_users

CLIENTS, LABELS_EACH, OVERLAP = 20, 50, 2
KILL_AFTER = 300  # acknowledged labels before the SIGKILL


class Client(threading.Thread):
    """One annotator: log in, then fetch-and-label in a bounded loop, retrying while the server is down."""

    def __init__(self, url: str, username: str, acked: list, lock: threading.Lock):
        super().__init__(daemon=True)
        self.url, self.username, self.acked, self.lock = url, username, acked, lock
        self.mine: list[int] = []
        self.error: str | None = None

    def call(self, http: httpx.Client, path: str, body: dict | None = None) -> httpx.Response:
        for _attempt in range(300):  # bounded: at most ~60 s of retrying through a restart
            try:
                r = http.post(path, json=body)
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            if r.status_code >= 500:
                time.sleep(0.2)
                continue
            return r
        raise RuntimeError(f"{self.username}: server unreachable for too long")

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=60) as http:
                token = self.call(http, "/api/login", {"username": self.username, "password": PASSWORD}).json()
                http.headers["Authorization"] = f"Bearer {token['token']}"
                r = self.call(http, "/api/rounds/load/next")
                task = r.json() if r.status_code == 200 else None
                while task is not None and len(self.mine) < LABELS_EACH:
                    ids = [c["id"] for c in task["candidates"]]
                    last = len(self.mine) == LABELS_EACH - 1
                    r = self.call(http, f"/api/tasks/{task['task_id']}/label" + ("" if last else "?next=true"),
                                  {"ranking": ids, "ratings": {str(ids[0]): {"relevance": 5}}})
                    assert r.status_code == 200, r.text
                    self.mine.append(task["task_id"])
                    with self.lock:
                        self.acked.append((task["task_id"], r.json()["label_id"]))
                    task = r.json().get("next")
        except BaseException as exc:  # reported by the test
            self.error = f"{type(exc).__name__}: {exc}"


@pytest.mark.slow(seconds=60)
def test_concurrent_labelling_survives_sigkill(any_db_url, live_server_factory):
    db_url = any_db_url
    Sessions = open_db(db_url)
    items = [{"prompt": f"prompt {i}", "responses": [f"{i}-a", f"{i}-b", f"{i}-c"]}
             for i in range(CLIENTS * LABELS_EACH // OVERLAP + 20)]
    with Sessions() as db:
        tasks.add_items(db, tasks.create_round(db, "load", [{"name": "relevance", "min": 1, "max": 7}],
                                               overlap=OVERLAP), items)
    names = [f"load{i:02d}" for i in range(CLIENTS)]
    create_users(db_url, dict.fromkeys(names, "annotator"))

    server = live_server_factory(db_url).start()
    acked: list[tuple[int, int]] = []
    lock = threading.Lock()
    clients = [Client(server.url, n, acked, lock) for n in names]
    for c in clients:
        c.start()
    deadline = time.monotonic() + 240
    while len(acked) < KILL_AFTER and time.monotonic() < deadline and any(c.is_alive() for c in clients):
        time.sleep(0.05)
    acked_before_kill = len(acked)
    server.kill()
    time.sleep(1.0)  # clients hit a dead port and retry
    live_server_factory(db_url, port=server.port).start()
    for c in clients:
        c.join(timeout=max(1.0, deadline - time.monotonic()))

    assert KILL_AFTER <= acked_before_kill < CLIENTS * LABELS_EACH, "the kill did not land mid-load"
    assert [c.error for c in clients if c.error] == []
    assert all(len(c.mine) == LABELS_EACH for c in clients)
    assert len(acked) == CLIENTS * LABELS_EACH
    with Sessions() as db:
        stored = dict(db.execute(select(Label.assignment_id, Label.id)).all())
        # Every acknowledged label is present, under the id the server answered with.
        assert all(stored.get(task_id) == label_id for task_id, label_id in acked)
        # Nothing lost, nothing duplicated: one label per assignment, and no extra ones.
        assert db.scalar(select(func.count(Label.id))) == len(acked) == len({t for t, _ in acked})
        per_item = db.execute(select(Assignment.prompt_id, func.count(Assignment.id))
                              .where(Assignment.status != "skipped").group_by(Assignment.prompt_id)).all()
        assert max(n for _, n in per_item) <= OVERLAP
        pairs = db.execute(select(Assignment.prompt_id, Assignment.user_id)).all()
        assert len(pairs) == len(set(pairs))
