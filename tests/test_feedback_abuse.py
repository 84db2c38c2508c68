"""The labelling app under abuse and abandonment: login throttling (JSON token login and the HTML form)
and task leases (an abandoned task goes back to the queue; a late label is counted once, or refused).
Time comes from an injected clock, so no test sleeps."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from alignloop.cli import main
from alignloop.feedback import auth, tasks
from alignloop.feedback import db as feedback_db
from alignloop.feedback.db import Assignment, Label, LoginFailure, Prompt, User, make_engine, open_db, utcnow
from alignloop.feedback.web.app import create_app
from feedback_fixtures import *  # noqa: F403  (fixtures)
from feedback_fixtures import PASSWORD, api_login, create_users


class Clock:
    """A clock that only moves when told."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(fb_db_url, fb_sessions, fb_users, clock):
    with TestClient(create_app(fb_db_url, sessions=fb_sessions, clock=clock)) as c:
        yield c


@pytest.fixture
def any_backend_client(any_db_url, clock):
    """The app with an admin and two annotators, on SQLite and on PostgreSQL."""
    create_users(any_db_url, {"admin": "admin", "ann1": "annotator", "ann2": "annotator"})
    with TestClient(create_app(any_db_url, clock=clock)) as c:
        yield c


def login(client, username: str, password: str):
    return client.post("/api/login", json={"username": username, "password": password})


# ---------------------------------------------------------------- back-off rule


def test_backoff_doubles_after_the_free_failures_and_is_capped():
    assert [auth.backoff(n, 5) for n in (1, 4)] == [None, None]
    assert [auth.backoff(n, 5).total_seconds() for n in (5, 6, 7, 10)] == [1, 2, 4, 32]
    assert auth.backoff(15, 5).total_seconds() == 900 == auth.backoff(10_000, 5).total_seconds()


# ---------------------------------------------------------------- login throttling


def test_twenty_rapid_wrong_passwords_get_429_and_the_right_password_works_after_the_backoff(
        any_backend_client, clock):
    client = any_backend_client
    answers = [login(client, "ann1", f"wrong-{i}") for i in range(20)]
    codes = [r.status_code for r in answers]
    # Five free failures, then blocked: the blocked attempts are not checked and do not count.
    assert codes == [401] * 5 + [429] * 15
    assert all(int(r.headers["Retry-After"]) == 1 for r in answers[5:])
    assert "too many failed logins" in answers[5].json()["detail"]
    # Even the right password waits out the back-off: it is not checked while blocked.
    assert login(client, "ann1", PASSWORD).status_code == 429
    clock.advance(1)
    assert login(client, "ann1", PASSWORD).status_code == 200
    # The success cleared the count: five more free failures.
    assert [login(client, "ann1", "wrong").status_code for _ in range(6)] == [401] * 5 + [429]


def test_each_failure_past_the_free_ones_doubles_the_wait_up_to_the_cap(client, clock):
    for _ in range(5):
        assert login(client, "ann1", "wrong").status_code == 401
    waits = []
    for _ in range(12):
        r = login(client, "ann1", "wrong")
        assert r.status_code == 429
        waits.append(int(r.headers["Retry-After"]))
        clock.advance(waits[-1])
        assert login(client, "ann1", "wrong").status_code == 401  # the block ended; this failure counts
    assert waits == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 900, 900]


def test_someone_elses_failures_from_another_address_never_block_the_account(fb_db_url, fb_sessions, fb_users,
                                                                              clock):
    app = create_app(fb_db_url, sessions=fb_sessions, clock=clock)
    with TestClient(app, client=("203.0.113.9", 5000)) as attacker, \
            TestClient(app, client=("198.51.100.7", 5000)) as owner:
        assert [login(attacker, "ann1", "guess").status_code for _ in range(8)][-1] == 429
        assert login(owner, "ann1", PASSWORD).status_code == 200
        # The attacker's address stays blocked for this account, and for other accounts only once the
        # address's own count over all usernames runs out.
        assert login(attacker, "ann1", PASSWORD).status_code == 429
        assert login(attacker, "ann2", "guess").status_code == 401


def test_one_address_trying_many_accounts_is_throttled(client):
    codes = [login(client, f"user{i}", "guess").status_code for i in range(auth.ADDRESS_FREE_FAILURES + 1)]
    assert codes == [401] * auth.ADDRESS_FREE_FAILURES + [429]
    assert login(client, "ann2", PASSWORD).status_code == 429  # the whole address waits


def test_the_html_login_form_is_throttled_too(client, clock):
    def submit(password: str):
        page = client.get("/login")
        token = re.search(r'name="login_csrf" value="([^"]+)"', page.text).group(1)
        return client.post("/login", data={"username": "ann1", "password": password, "login_csrf": token,
                                           "next": "/"}, follow_redirects=False)

    assert [submit("wrong").status_code for _ in range(5)] == [401] * 5
    blocked = submit(PASSWORD)
    assert blocked.status_code == 429 and blocked.headers["Retry-After"] == "1"
    assert "Too many failed logins" in blocked.text
    clock.advance(1)
    assert submit(PASSWORD).status_code == 303


def test_admins_see_failed_login_counts(client, clock):
    for _ in range(3):
        login(client, "ann2", "wrong")
    admin = api_login(client, "admin")
    users = {u["username"]: u for u in client.get("/api/users", headers=admin).json()}
    assert users["ann2"]["failed_logins"] == 3 and users["ann1"]["failed_logins"] == 0
    page = client.get("/admin", headers=admin)
    assert re.search(r"<td>ann2</td>.*?<td>3</td></tr>", page.text)
    clock.advance(auth.FORGET_FAILURES_AFTER.total_seconds() + 1)
    users = {u["username"]: u for u in client.get("/api/users", headers=admin).json()}
    assert users["ann2"]["failed_logins"] == 0  # forgotten after a day


# ---------------------------------------------------------------- task leases


def make_round(client, admin, overlap: int, lease_minutes: int = 30, n_items: int = 1) -> None:
    r = client.post("/api/rounds", json={"name": "r", "overlap": overlap, "lease_minutes": lease_minutes},
                    headers=admin)
    assert r.status_code == 201 and r.json()["lease_minutes"] == lease_minutes, r.text
    items = [{"prompt": f"p{i}", "responses": [f"p{i} a", f"p{i} b"]} for i in range(n_items)]
    assert client.post("/api/rounds/r/items", json={"items": items}, headers=admin).status_code == 201


def next_task(client, headers):
    return client.post("/api/rounds/r/next", headers=headers)


def label(client, headers, task):
    return client.post(f"/api/tasks/{task['task_id']}/label", headers=headers,
                       json={"ranking": [c["id"] for c in task["candidates"]]})


def slots_and_labels(sessions) -> tuple[int, int]:
    with sessions() as db:
        return db.scalar(select(Prompt.assigned)), len(db.scalars(select(Label)).all())


def test_a_leased_task_expires_and_is_reassigned(client, clock, fb_sessions):
    admin, ann1, ann2 = (api_login(client, u) for u in ("admin", "ann1", "ann2"))
    make_round(client, admin, overlap=1, lease_minutes=10)
    first = next_task(client, ann1).json()
    assert first["status"] == "open"
    assert first["lease_expires_at"] == (clock.now + dt.timedelta(minutes=10)).isoformat() + "Z"  # UTC
    assert next_task(client, ann2).status_code == 204  # the one slot is leased
    clock.advance(10 * 60 - 1)
    assert next_task(client, ann2).status_code == 204  # not yet
    clock.advance(2)
    second = next_task(client, ann2).json()  # ann1 closed the tab: the item went back to the queue
    assert second["prompt"] == first["prompt"] and second["task_id"] != first["task_id"]
    assert client.get(f"/api/tasks/{first['task_id']}", headers=ann1).json()["status"] == "expired"
    assert slots_and_labels(fb_sessions) == (1, 0)
    assert label(client, ann2, second).json()["created"] is True
    assert slots_and_labels(fb_sessions) == (1, 1)


def test_a_late_label_without_room_is_refused_and_nothing_is_counted(client, clock, fb_sessions):
    admin, ann1, ann2 = (api_login(client, u) for u in ("admin", "ann1", "ann2"))
    make_round(client, admin, overlap=1)
    late = next_task(client, ann1).json()
    clock.advance(31 * 60)
    taken = next_task(client, ann2).json()
    refused = label(client, ann1, late)
    assert refused.status_code == 409
    assert "lease ran out (30 minutes)" in refused.json()["detail"] and "not stored" in refused.json()["detail"]
    assert slots_and_labels(fb_sessions) == (1, 0)
    assert label(client, ann2, taken).status_code == 200
    assert slots_and_labels(fb_sessions) == (1, 1)
    assert label(client, ann1, late).status_code == 409  # still refused; the item is full


def test_a_late_label_with_room_is_accepted_once(any_backend_client, clock):
    client = any_backend_client
    sessions = client.app.state.sessions
    admin, ann1, ann2 = (api_login(client, u) for u in ("admin", "ann1", "ann2"))
    make_round(client, admin, overlap=2)
    late = next_task(client, ann1).json()
    clock.advance(31 * 60)
    other = next_task(client, ann2).json()  # expires ann1's lease: the slot goes back (1 of 2 taken)
    assert other["prompt"] == late["prompt"]
    assert slots_and_labels(sessions) == (1, 0)
    first = label(client, ann1, late)
    assert first.status_code == 200 and first.json()["created"] is True
    again = label(client, ann1, late)  # a retry returns the stored label, counting nothing twice
    assert again.json() == {**first.json(), "created": False}
    assert label(client, ann2, other).status_code == 200
    assert slots_and_labels(sessions) == (2, 2)
    with sessions() as db:
        assert {a.status for a in db.scalars(select(Assignment))} == {"done"}


def test_a_late_label_before_anyone_reclaimed_the_slot_keeps_it(client, clock, fb_sessions):
    admin, ann1 = (api_login(client, u) for u in ("admin", "ann1"))
    make_round(client, admin, overlap=1)
    task = next_task(client, ann1).json()
    clock.advance(60 * 60)
    assert label(client, ann1, task).status_code == 200
    assert slots_and_labels(fb_sessions) == (1, 1)
    assert next_task(client, ann1).status_code == 204  # its slot was not given back as well


def test_an_annotator_whose_lease_expired_can_take_the_item_again(client, clock, fb_sessions):
    admin, ann1 = (api_login(client, u) for u in ("admin", "ann1"))
    make_round(client, admin, overlap=1)
    first = next_task(client, ann1).json()
    clock.advance(31 * 60)
    again = next_task(client, ann1).json()  # the only annotator: the same assignment, renewed
    assert again["task_id"] == first["task_id"] and again["candidates"] == first["candidates"]
    assert again["status"] == "open"
    assert again["lease_expires_at"] == (clock.now + dt.timedelta(minutes=30)).isoformat() + "Z"
    assert label(client, ann1, again).status_code == 200
    assert slots_and_labels(fb_sessions) == (1, 1)


def test_a_skip_on_an_expired_lease_gives_back_no_second_slot(client, clock, fb_sessions):
    admin, ann1, ann2 = (api_login(client, u) for u in ("admin", "ann1", "ann2"))
    make_round(client, admin, overlap=1)
    late = next_task(client, ann1).json()
    clock.advance(31 * 60)
    next_task(client, ann2)
    skip = client.post(f"/api/tasks/{late['task_id']}/label", json={"skip": True}, headers=ann1)
    assert skip.status_code == 200 and skip.json()["skipped"] is True
    assert slots_and_labels(fb_sessions)[0] == 1  # ann2 still holds the one slot


def test_expire_leases_gives_each_slot_back_once(fb_sessions, fb_users):
    now = utcnow()
    with fb_sessions() as db:
        rnd = tasks.create_round(db, "r", [{"name": "q"}], overlap=3, lease_minutes=5)
        tasks.add_items(db, rnd, [{"prompt": "p", "responses": ["a", "b"]}])
        users = [db.scalar(select(User).where(User.username == n)) for n in ("ann1", "ann2", "ann3")]
        for u in users:
            tasks.next_task(db, u, rnd, now)
        assert tasks.expire_leases(db, rnd, now + dt.timedelta(minutes=4)) == 0
        assert tasks.expire_leases(db, rnd, now + dt.timedelta(minutes=6)) == 3
        assert tasks.expire_leases(db, rnd, now + dt.timedelta(minutes=7)) == 0
        assert db.scalar(select(Prompt.assigned)) == 0


def test_round_lease_is_checked_and_set_from_the_cli(tmp_path, capsys, fb_db_url, fb_sessions):
    assert main(["feedback", "create-round", "--db", fb_db_url, "--name", "r", "--lease-minutes", "90"]) == 0
    assert "lease 90 minutes" in capsys.readouterr().out
    with fb_sessions() as db:
        assert tasks.get_round(db, "r").lease_minutes == 90
        with pytest.raises(tasks.Invalid, match="lease_minutes"):
            tasks.create_round(db, "bad", [{"name": "q"}], lease_minutes=0)


def test_a_database_from_before_leases_is_upgraded_in_place(fb_db_url):
    engine = make_engine(fb_db_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(feedback_db.__file__).parent / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.exec_driver_sql("INSERT INTO rounds (name, criteria, guidelines, overlap, created_at) "
                             "VALUES ('old', '[]', '', 1, '2026-01-01 00:00:00')")
    engine.dispose()
    with open_db(fb_db_url)() as db:
        old = tasks.get_round(db, "old")
        assert old.lease_minutes == 30


def test_failures_are_forgotten_a_day_after_the_last_one(client, clock, fb_sessions):
    for _ in range(4):
        assert login(client, "ann1", "wrong").status_code == 401
    clock.advance(auth.FORGET_FAILURES_AFTER.total_seconds() + 1)
    assert login(client, "ann3", "wrong").status_code == 401  # any failure clears out day-old counts
    with fb_sessions() as db:
        assert {(r.username, r.failures) for r in db.scalars(select(LoginFailure))} == {("ann3", 1), ("", 1)}
    assert [login(client, "ann1", "wrong").status_code for _ in range(5)] == [401] * 5  # the count starts again


def test_health_answers_without_a_login_and_says_when_the_database_does_not(client, tmp_path):
    assert client.get("/health").json() == {"status": "ok"}
    unreachable = sessionmaker(create_engine(f"sqlite:///{tmp_path}/no-such-folder/feedback.db"))
    with TestClient(create_app("unused", sessions=unreachable)) as down:
        answer = down.get("/health")
    assert answer.status_code == 503 and answer.json() == {"detail": "the database does not answer"}


def test_the_labelling_page_refuses_a_late_label_without_room_with_the_message(client, clock, fb_sessions):
    page = client.get("/login")
    token = re.search(r'name="login_csrf" value="([^"]+)"', page.text).group(1)
    assert client.post("/login", data={"username": "ann1", "password": PASSWORD, "login_csrf": token,
                                       "next": "/"}, follow_redirects=False).status_code == 303
    make_round(client, api_login(client, "admin"), overlap=1)
    form = client.get("/rounds/r/label").text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
    task_id = re.search(r'name="task_id" value="([0-9]+)"', form).group(1)
    ranks = {f"rank_{cid}": str(n) for n, cid in enumerate(re.findall(r'name="rank_([0-9]+)"', form), 1)}
    clock.advance(31 * 60)
    assert next_task(client, api_login(client, "ann2")).status_code == 200  # the item went to ann2
    late = client.post("/rounds/r/label", data={"csrf_token": csrf, "task_id": task_id, **ranks},
                       follow_redirects=False)
    assert late.status_code == 409 and "your lease ran out (30 minutes)" in late.text
    assert slots_and_labels(fb_sessions) == (1, 0)
