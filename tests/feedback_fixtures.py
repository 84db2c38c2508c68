"""Fixtures for the human-feedback tests (loaded as a pytest plugin from conftest.py).

- ``fb_sessions`` / ``fb_client``: a fresh SQLite feedback database and an in-process test client.
- ``postgres_server``: a throwaway PostgreSQL cluster (Debian's binaries, run as the ``postgres``
  user when we are root), listening on 127.0.0.1 only, removed afterwards.
- ``LiveServer``: the real ``alignloop label`` process on loopback, which tests may SIGKILL and restart.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

PASSWORD = "correct-horse-1"
# argon2's cheapest profile: the production profile costs ~0.6 s per hash on a busy 2-core machine.
os.environ.setdefault("ALIGNLOOP_ARGON2", "cheap")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- in-process app on SQLite


@pytest.fixture
def fb_db_url(tmp_path) -> str:
    return str(tmp_path / "feedback.db")


@pytest.fixture
def fb_sessions(fb_db_url):
    from alignloop.feedback.db import open_db

    return open_db(fb_db_url)


@pytest.fixture
def fb_users(fb_sessions) -> dict[str, str]:
    """admin, reviewer and three annotators, all with PASSWORD; returns username -> role."""
    from alignloop.feedback import auth

    users = {"admin": "admin", "rev": "reviewer", "ann1": "annotator", "ann2": "annotator", "ann3": "annotator"}
    with fb_sessions() as db:
        for name, role in users.items():
            auth.create_user(db, name, role, PASSWORD)
        db.commit()
    return users


@pytest.fixture
def fb_app(fb_db_url, fb_sessions, fb_users):
    from alignloop.feedback.web.app import create_app

    return create_app(fb_db_url, sessions=fb_sessions)


@pytest.fixture
def fb_client(fb_app):
    from fastapi.testclient import TestClient

    with TestClient(fb_app) as client:
        yield client


def api_login(client, username: str, password: str = PASSWORD) -> dict[str, str]:
    r = client.post("/api/login", json={"username": username, "password": password})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


# ---------------------------------------------------------------- PostgreSQL


def postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl live: ``pg_config --bindir`` or Debian's /usr/lib/postgresql/N/bin."""
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]),
                         reverse=True)
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def postgres_server():
    """Start a throwaway cluster; yields a function that creates a fresh database and returns its URL."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed; `make test` installs them")
    root = Path(tempfile.mkdtemp(prefix="alignloop-pg-"))
    as_pg: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(root, "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
    os.chmod(root, 0o700)
    data, port = root / "data", free_port()

    def run(*cmd: str) -> None:
        subprocess.run([*as_pg, *cmd], check=True, capture_output=True, timeout=120)

    run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
    # fsync off (-F): these tests kill the app server, never PostgreSQL itself.
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
        "-o", f"-h 127.0.0.1 -p {port} -k {root} -F -c max_connections=200", "start")

    def new_database() -> str:
        import psycopg

        name = "fb_" + uuid.uuid4().hex[:10]
        with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{port}/{name}"

    try:
        yield new_database
    finally:
        subprocess.run([*as_pg, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_url(request, tmp_path) -> str:
    """A fresh feedback database URL on each backend."""
    if request.param == "sqlite":
        return str(tmp_path / "feedback.db")
    return request.getfixturevalue("postgres_server")()


# ---------------------------------------------------------------- the real server process


class LiveServer:
    """``alignloop label`` as a child process on 127.0.0.1."""

    def __init__(self, db_url: str, log_path: Path, port: int | None = None):
        self.db_url, self.log_path = db_url, log_path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> LiveServer:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "alignloop", "label", "--db", self.db_url, "--host", "127.0.0.1",
             "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/login", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not start in time")

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers, no flushing; what is not committed is gone."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def live_server_factory(tmp_path):
    servers: list[LiveServer] = []

    def make(db_url: str, port: int | None = None) -> LiveServer:
        s = LiveServer(db_url, tmp_path / f"server-{len(servers)}.log", port)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


def create_users(db_url: str, users: dict[str, str]) -> None:
    from alignloop.feedback import auth
    from alignloop.feedback.db import open_db

    with open_db(db_url)() as db:
        for name, role in users.items():
            auth.create_user(db, name, role, PASSWORD)
        db.commit()
