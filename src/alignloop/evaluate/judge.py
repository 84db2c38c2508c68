"""Win rates: automatic (per prompt, whose score is higher) and human (blind side-by-side votes).

A win counts 1, a tie 1/2, a loss 0; the win rate is their mean over prompts, with a 95% Wilson
score interval on that many trials. The human win rates come from the feedback database, where
people voted blind between two models' responses to the same prompt; they are computed by the
feedback module itself so the report and the labelling app always agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from alignloop.errors import UserError


@dataclass
class WinRate:
    win_rate: float
    ci_low: float
    ci_high: float
    wins: int
    ties: int
    losses: int
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (``successes`` may hold halves from ties)."""
    from alignloop.feedback.tasks import wilson_interval as interval

    return interval(successes, n, z)


def win_rate(a: Sequence[float], b: Sequence[float], tie_tolerance: float = 1e-9) -> WinRate:
    """How often ``a[i]`` beats ``b[i]`` (scores of two models on the same prompts)."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} scores against {len(b)}")
    wins = sum(x - y > tie_tolerance for x, y in zip(a, b, strict=True))
    losses = sum(y - x > tie_tolerance for x, y in zip(a, b, strict=True))
    ties = len(a) - wins - losses
    n = len(a)
    score = wins + 0.5 * ties
    lo, hi = wilson_interval(score, n)
    return WinRate(score / n if n else 0.5, lo, hi, wins, ties, losses, n)


def human_win_rates(db_url: str, round_name: str | None = None) -> list[dict]:
    """Blind side-by-side win rates per round and model pair from the feedback database."""
    from sqlalchemy import select

    from alignloop.feedback.db import Round, open_db
    from alignloop.feedback.tasks import win_rates

    session = open_db(db_url, upgrade=False)
    with session() as db:
        query = select(Round).order_by(Round.id)
        if round_name:
            query = query.where(Round.name == round_name)
        rounds = db.scalars(query).all()
        if round_name and not rounds:
            raise UserError(f"--feedback-round: no round named {round_name!r} in {db_url}")
        return [{"round": rnd.name, **row} for rnd in rounds for row in win_rates(db, rnd)]
