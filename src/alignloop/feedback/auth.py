"""Credentials: argon2 password hashes, random tokens stored as SHA-256, CSRF tokens, role checks, and the
account rules the web app runs (log in, log out, invite, accept an invite).

Three kinds of token share one table: ``session`` (browser cookie), ``api`` (``Authorization:
Bearer``) and ``invite`` (one-time link that lets a new person choose a password). Tokens are 256
random bits, so a fast hash is enough to make a stolen database useless; passwords are low-entropy
and get argon2. A browser form must carry a CSRF token derived (HMAC) from the session secret, which
a cross-site page cannot read; bearer requests need none because browsers never attach them.

Login throttling: failed logins are counted in the database (so every worker process sees the same
counts) per (username, client address) and per client address over all usernames. The 5th failure of a
(username, address) and the 20th of an address block that key for 1 s, and each further failure doubles
the wait (2 s, 4 s, ...) up to 15 minutes; a blocked attempt is answered without checking the password and does not count. The right
password from the same address clears that (username, address) count. Nobody is ever locked out for
good: a block always ends, counts are forgotten a day after the last failure, and someone else's
failures from another address never touch yours (from a shared address the per-address count can slow
everyone there, by at most the back-off cap).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import math
import os
import secrets

from argon2 import PasswordHasher, profiles
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from alignloop.errors import UserError
from alignloop.feedback.db import ROLE_RANK, ROLES, LoginFailure, Token, User, utcnow


@functools.cache
def _hasher() -> PasswordHasher:
    # RFC 9106's low-memory profile (argon2id, 64 MiB). ALIGNLOOP_ARGON2=cheap selects argon2-cffi's cheapest
    # profile, for tests and throwaway demos only. Hashes carry their parameters, so both always verify.
    if os.environ.get("ALIGNLOOP_ARGON2") == "cheap":
        return PasswordHasher.from_parameters(profiles.CHEAPEST)
    return PasswordHasher.from_parameters(profiles.RFC_9106_LOW_MEMORY)


@functools.cache
def _dummy_hash() -> str:
    # Verifying against this keeps a login for an unknown user as slow as one for a known user.
    return _hasher().hash("not-a-real-password")


class Unauthorized(Exception):
    """Wrong credentials, or a token that is unknown, expired or already used."""


class Throttled(Exception):
    """Too many failed logins from this address (for this username); try again after ``retry_after`` s."""

    def __init__(self, retry_after: int):
        super().__init__(f"too many failed logins; try again in {retry_after} s")
        self.retry_after = retry_after


LIFETIMES = {"session": dt.timedelta(days=7), "api": dt.timedelta(days=30), "invite": dt.timedelta(days=7)}
MIN_PASSWORD = 8


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def csrf_for(session_secret: str) -> str:
    return hmac.new(session_secret.encode(), b"alignloop-csrf", hashlib.sha256).hexdigest()


def check_csrf(session_secret: str, given: str | None) -> bool:
    # Compared as bytes: compare_digest refuses non-ASCII str, and a header may carry any latin-1 text.
    return bool(given) and hmac.compare_digest(csrf_for(session_secret).encode(), given.encode())


def check_password_rules(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"password: must be at least {MIN_PASSWORD} characters")
    if len(password) > 256:
        raise UserError("password: must be at most 256 characters")


def create_user(db: Session, username: str, role: str, password: str | None = None) -> User:
    if role not in ROLES:
        raise UserError(f"role: must be one of {', '.join(ROLES)} (got {role!r})")
    if not username or len(username) > 64 or not all(c.isalnum() or c in "._-" for c in username):
        raise UserError("username: 1-64 letters, digits, '.', '_' or '-'")
    if db.scalar(select(User).where(User.username == username)) is not None:
        raise UserError(f"username: {username!r} already exists")
    if password is not None:
        check_password_rules(password)
    user = User(username=username, role=role, password_hash=_hasher().hash(password) if password else None)
    db.add(user)
    db.flush()
    return user


def set_password(user: User, password: str) -> None:
    check_password_rules(password)
    user.password_hash = _hasher().hash(password)


def authenticate(db: Session, username: str, password: str) -> User | None:
    user = db.scalar(select(User).where(User.username == username))
    known = user is not None and user.active and bool(user.password_hash)
    try:
        _hasher().verify(user.password_hash if known else _dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        return None
    return user if known else None


def issue_token(db: Session, user: User, kind: str) -> str:
    secret = secrets.token_urlsafe(32)
    db.add(Token(token_hash=hash_secret(secret), kind=kind, user_id=user.id, expires_at=utcnow() + LIFETIMES[kind]))
    db.flush()
    return secret


def lookup_token(db: Session, secret: str | None, kind: str) -> Token | None:
    """The live token of ``kind`` with this secret (user active, not expired, invite not used)."""
    if not secret or len(secret) > 200:
        return None
    tok = db.scalar(select(Token).options(joinedload(Token.user))
                    .where(Token.token_hash == hash_secret(secret), Token.kind == kind))
    if tok is None or tok.expires_at < utcnow() or tok.used_at is not None or not tok.user.active:
        return None
    return tok


def revoke(db: Session, secret: str) -> None:
    tok = db.scalar(select(Token).where(Token.token_hash == hash_secret(secret)))
    if tok is not None:
        db.delete(tok)
    db.commit()


def has_role(user: User, minimum: str) -> bool:
    return ROLE_RANK[user.role] >= ROLE_RANK[minimum]


# ---------------------------------------------------------------- login throttling

FREE_FAILURES = 5  # the failure of a (username, address) that first blocks it
ADDRESS_FREE_FAILURES = 20  # the same per address over all usernames (one address trying many accounts)
FIRST_BACKOFF = dt.timedelta(seconds=1)
MAX_BACKOFF = dt.timedelta(minutes=15)
FORGET_FAILURES_AFTER = dt.timedelta(days=1)
ANY_USER = ""  # the username of an address's count over all usernames


def backoff(failures: int, free: int) -> dt.timedelta | None:
    """How long a key is blocked after its ``failures``-th failure: not at all before the ``free``-th, then
    1 s, 2 s, 4 s, ... up to MAX_BACKOFF."""
    if failures < free:
        return None
    doublings = min(failures - free, 20)  # 2**20 s is far past the cap already
    return min(FIRST_BACKOFF * 2**doublings, MAX_BACKOFF)


def throttle_keys(username: str) -> list[tuple[str, int]]:
    """(username column, free failures) of the counts of an address that a login as ``username`` touches."""
    return [(username[:64], FREE_FAILURES), (ANY_USER, ADDRESS_FREE_FAILURES)]


def check_throttle(db: Session, username: str, address: str, now: dt.datetime) -> None:
    names = [name for name, _ in throttle_keys(username)]
    until = db.scalar(select(func.max(LoginFailure.blocked_until)).where(
        LoginFailure.address == address, LoginFailure.username.in_(names)))
    if until is not None and until > now:
        raise Throttled(max(1, math.ceil((until - now).total_seconds())))


def record_failure(db: Session, username: str, address: str, now: dt.datetime) -> None:
    """Count a failed login on each key and block the keys past their free failures; commits. Counts a day
    old are deleted on the way, which keeps the table to the last day's failures."""
    db.execute(delete(LoginFailure).where(LoginFailure.last_failure_at < now - FORGET_FAILURES_AFTER))
    for _attempt in range(3):
        try:
            for name, free in throttle_keys(username):
                row = db.scalar(select(LoginFailure).where(LoginFailure.username == name,
                                                           LoginFailure.address == address).with_for_update())
                if row is None:
                    row = LoginFailure(username=name, address=address, failures=0)
                    db.add(row)
                row.failures += 1
                row.last_failure_at = now
                wait = backoff(row.failures, free)
                row.blocked_until = now + wait if wait is not None else None
            db.commit()
            return
        except IntegrityError:  # another worker created the same key's row first; count on that one
            db.rollback()


def failed_logins(db: Session, now: dt.datetime) -> dict[str, int]:
    """Failed logins per username over the last day (the counts not yet forgotten), from any address."""
    rows = db.execute(select(LoginFailure.username, func.sum(LoginFailure.failures))
                      .where(LoginFailure.username != ANY_USER,
                             LoginFailure.last_failure_at > now - FORGET_FAILURES_AFTER)
                      .group_by(LoginFailure.username)).all()
    return {name: int(n) for name, n in rows}


def log_in(db: Session, username: str, password: str, kind: str, address: str,
           now: dt.datetime | None = None) -> tuple[User, str]:
    """Check the password and issue a ``kind`` token (``session`` or ``api``); commits. Raises Throttled
    while ``address`` is blocked for ``username`` (the password is then not checked) and Unauthorized
    for wrong credentials, which also counts towards a block."""
    now = now or utcnow()
    address = address[:64]
    check_throttle(db, username, address, now)
    user = authenticate(db, username, password)
    if user is None:
        db.rollback()
        record_failure(db, username, address, now)
        raise Unauthorized("wrong username or password")
    db.execute(delete(LoginFailure).where(LoginFailure.username == username[:64],
                                          LoginFailure.address == address))
    secret = issue_token(db, user, kind)
    db.commit()
    return user, secret


def invite(db: Session, username: str, role: str) -> tuple[User, str]:
    """A new user without a password and the secret of their one-time invite link; commits."""
    invitee = create_user(db, username, role)
    secret = issue_token(db, invitee, "invite")
    db.commit()
    return invitee, secret


def open_invite(db: Session, secret: str) -> Token:
    invite_token = lookup_token(db, secret, "invite")
    if invite_token is None:
        raise Unauthorized("invite link is invalid, used or expired")
    return invite_token


def accept_invite(db: Session, invite_token: Token, password: str, kind: str) -> str:
    """Set the invitee's password, use up the invite and issue a ``kind`` token for them; commits."""
    set_password(invite_token.user, password)
    invite_token.used_at = utcnow()
    secret = issue_token(db, invite_token.user, kind)
    db.commit()
    return secret


def list_users(db: Session) -> list[User]:
    return list(db.scalars(select(User).order_by(User.id)))
