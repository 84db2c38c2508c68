"""The feedback database: SQLAlchemy 2 models and the engine/session set-up.

One database holds every round of human feedback: rounds (criteria, scales, guidelines,
overlap), prompts, candidate responses (which model, which generation settings), the people
(annotator / reviewer / admin, hashed credentials), task assignments with their leases, labels (ranking,
per-criterion ratings, flags, comment, skip), reviews of policy samples, blind side-by-side votes and the
failed-login counts that throttle logins.

SQLite (a file, WAL mode) is the default; PostgreSQL works by URL. The schema is created and
upgraded by Alembic (``migrations/``), never by ``create_all``, so an old database is upgraded
in place.

Durability: a label is committed (SQLite ``synchronous=FULL``) before the API answers 200.
SQLite transactions start with ``BEGIN IMMEDIATE`` so concurrent writers queue on the busy
timeout instead of failing when a read transaction tries to upgrade to a write.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from alignloop.errors import UserError

ROLES = ("annotator", "reviewer", "admin")
# A reviewer can also label; an admin can do everything.
ROLE_RANK = {r: i for i, r in enumerate(ROLES)}
FLAG_KINDS = ("unsafe", "wrong", "off_topic")
DEFAULT_LEASE_MINUTES = 30
DEFAULT_CRITERIA = [
    {"name": "relevance", "min": 1, "max": 7, "guideline": "Does the response address what the prompt asks?"},
    {"name": "consistency", "min": 1, "max": 7, "guideline": "Is it coherent and free of contradictions?"},
    {"name": "creativity", "min": 1, "max": 7, "guideline": "Is it original rather than generic?"},
]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    # argon2 hash; NULL until an invited user sets a password.
    password_hash: Mapped[str | None] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Token(Base):
    """Browser sessions, API bearer tokens and one-time invites; only the SHA-256 of the secret is stored."""

    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # session | api | invite
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)
    used_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    user: Mapped[User] = relationship()


class Round(Base):
    __tablename__ = "rounds"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # [{"name", "min", "max", "guideline"}]
    criteria: Mapped[list[Any]] = mapped_column(JSON)
    guidelines: Mapped[str] = mapped_column(Text, default="")
    overlap: Mapped[int] = mapped_column(Integer, default=1)
    # How long an annotator holds an item before it goes back to the queue (a closed tab must not
    # block the round's quota forever).
    lease_minutes: Mapped[int] = mapped_column(Integer, default=DEFAULT_LEASE_MINUTES)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Prompt(Base):
    __tablename__ = "prompts"
    id: Mapped[int] = mapped_column(primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    # A chat prompt's messages ([{"role", "content"}]); ``text`` then holds what annotators see. NULL for
    # a plain prompt.
    messages: Mapped[list[Any] | None] = mapped_column(JSON)
    # Gold items: the known-correct ranking (candidate ids best..worst) to score annotators against.
    gold_ranking: Mapped[list[Any] | None] = mapped_column(JSON)
    # Open slots are handed out with an atomic conditional UPDATE on this counter, so concurrent
    # requests can never give an item to more annotators than the round's overlap.
    assigned: Mapped[int] = mapped_column(Integer, default=0)
    round: Mapped[Round] = relationship()
    candidates: Mapped[list[Candidate]] = relationship(back_populates="prompt", order_by="Candidate.id")


class Candidate(Base):
    __tablename__ = "candidates"
    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(255), default="")
    # "candidate": ranked/rated by annotators; "policy": a PPO sample for the review queue.
    kind: Mapped[str] = mapped_column(String(16), default="candidate")
    generation: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prompt: Mapped[Prompt] = relationship(back_populates="candidates")


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("prompt_id", "user_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    # open | done | skipped | expired (the lease ran out before a label came; the slot went back to the queue)
    status: Mapped[str] = mapped_column(String(16), default="open")
    # Order the candidates are shown in (shuffled per assignment so position carries no signal).
    order: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    prompt: Mapped[Prompt] = relationship()
    user: Mapped[User] = relationship()


class Label(Base):
    __tablename__ = "labels"
    id: Mapped[int] = mapped_column(primary_key=True)
    # One label per assignment: a retried submit can never create a duplicate.
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id", ondelete="CASCADE"), unique=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    skipped: Mapped[bool] = mapped_column(Boolean, default=False)
    # Candidate ids, best first; empty when skipped.
    ranking: Mapped[list[Any]] = mapped_column(JSON, default=list)
    comment: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    ratings: Mapped[list[Rating]] = relationship(cascade="all, delete-orphan")
    flags: Mapped[list[Flag]] = relationship(cascade="all, delete-orphan")
    user: Mapped[User] = relationship()


class Rating(Base):
    __tablename__ = "ratings"
    __table_args__ = (UniqueConstraint("label_id", "candidate_id", "criterion"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id", ondelete="CASCADE"), index=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"))
    criterion: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)


class Flag(Base):
    __tablename__ = "flags"
    id: Mapped[int] = mapped_column(primary_key=True)
    label_id: Mapped[int] = mapped_column(ForeignKey("labels.id", ondelete="CASCADE"), index=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))


class Review(Base):
    """A reviewer's decision on a policy (PPO) sample."""

    __tablename__ = "reviews"
    __table_args__ = (UniqueConstraint("candidate_id", "user_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    decision: Mapped[str] = mapped_column(String(16))  # approve | flag
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Comparison(Base):
    """A blind side-by-side vote between two models' responses to the same prompt."""

    __tablename__ = "comparisons"
    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    left_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"))
    right_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"))
    model_a: Mapped[str] = mapped_column(String(255))
    model_b: Mapped[str] = mapped_column(String(255))
    # "left" | "right" | "tie"; NULL while the pair is shown but not voted on.
    winner: Mapped[str | None] = mapped_column(String(8))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class LoginFailure(Base):
    """Failed logins per (username, client address), and per address over all usernames (``username`` is
    empty). In the database, so every worker process of the app counts the same failures."""

    __tablename__ = "login_failures"
    __table_args__ = (UniqueConstraint("username", "address"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64))
    address: Mapped[str] = mapped_column(String(64))
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_failure_at: Mapped[dt.datetime] = mapped_column(DateTime)
    # No login is tried for this key before then (NULL: not throttled).
    blocked_until: Mapped[dt.datetime | None] = mapped_column(DateTime)


# ---------------------------------------------------------------- engine and sessions


def normalize_url(db: str) -> str:
    """A plain path means a SQLite file; ``postgresql://`` uses the psycopg (v3) driver."""
    if "://" not in db:
        return f"sqlite:///{Path(db).expanduser().resolve()}"
    if db.startswith("postgresql://") or db.startswith("postgres://"):
        return "postgresql+psycopg://" + db.split("://", 1)[1]
    return db


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN IMMEDIATE instead of pysqlite's deferred BEGIN.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.close()


def _sqlite_begin(conn) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(db: str) -> Engine:
    url = normalize_url(db)
    try:
        parsed = make_url(url)
    except Exception:
        raise UserError(f"--db: not a database URL or path: {db!r}") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).parent
            if not folder.is_dir():
                raise UserError(f"--db: folder {folder} does not exist")
        # One connection: SQLite runs one write transaction at a time anyway, and threads queueing on the
        # pool wake up at once, where SQLite's busy handler would sleep in steps of up to 100 ms.
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False},
                               pool_size=1, max_overflow=0, pool_timeout=120)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_size=10, max_overflow=30, pool_pre_ping=True)


def migrate(engine: Engine) -> None:
    """Create or upgrade the schema to the newest Alembic revision."""

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def open_db(db: str, upgrade: bool = True) -> sessionmaker:
    """Session factory for ``db`` (URL or SQLite path), schema upgraded to the newest revision."""
    engine = make_engine(db)
    try:
        if upgrade:
            migrate(engine)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"--db {db}: cannot open the feedback database: {str(exc).splitlines()[0]}") from None
    return sessionmaker(engine, expire_on_commit=False)
