"""Administration of the feedback database outside the web app (the ``alignloop feedback`` commands):
users with a password, invite links, rounds and their items. Each call opens the database (upgrading its
schema), does one thing and commits it; a rule broken is a UserError."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from alignloop.data.io import read_records
from alignloop.errors import UserError
from alignloop.feedback import auth, tasks
from alignloop.feedback.db import DEFAULT_CRITERIA, DEFAULT_LEASE_MINUTES, User, open_db


def create_user(db_url: str, username: str, role: str, password: str) -> None:
    with open_db(db_url)() as db:
        auth.create_user(db, username, role, password)
        db.commit()


def set_up_users(db_url: str, roles: dict[str, str], password: str) -> None:
    """Every user of ``roles`` (username -> role) with ``password``: created in that order where missing,
    given the new password where they exist (their role stays as it is)."""
    with open_db(db_url)() as db:
        for username, role in roles.items():
            user = db.scalar(select(User).where(User.username == username))
            if user is None:
                auth.create_user(db, username, role, password)
            else:
                auth.set_password(user, password)
        db.commit()


def invite(db_url: str, username: str, role: str) -> str:
    """Create a user without a password; returns the one-time token of their invite link (/invite/TOKEN)."""
    with open_db(db_url)() as db:
        _, token = auth.invite(db, username, role)
    return token


def create_round(db_url: str, name: str, criteria: list[dict] | None = None, guidelines: str = "",
                 overlap: int = 1, lease_minutes: int = DEFAULT_LEASE_MINUTES) -> None:
    """A new round; without ``criteria`` it rates the default ones (relevance, consistency, creativity)."""
    criteria = [dict(c) for c in DEFAULT_CRITERIA] if criteria is None else criteria
    with open_db(db_url)() as db:
        try:
            tasks.create_round(db, name, criteria, guidelines, overlap, lease_minutes)
        except tasks.Invalid as exc:
            raise UserError(str(exc)) from None


def add_items(db_url: str, round_name: str, items_path: str | Path, kind: str = "candidate") -> int:
    """Add the prompts (with their responses) of a records file to a round; returns how many prompts."""
    items = [r.data for r in read_records(items_path)]
    with open_db(db_url)() as db:
        try:
            return tasks.add_items(db, tasks.get_round(db, round_name), items, kind)
        except (tasks.Invalid, tasks.NotFound) as exc:
            raise UserError(f"{items_path}: {exc}") from None
