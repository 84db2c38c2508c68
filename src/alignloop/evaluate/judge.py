"""Human win rates: blind side-by-side votes from the feedback database.

People voted blind between two models' responses to the same prompt; the win rates are computed by
the feedback module itself (``tasks.win_rates``) so the report and the labelling app always agree.
The automatic win rates (per prompt, whose score is higher) are ``alignloop.stats.paired_win_rate``.
"""

from __future__ import annotations

from sqlalchemy import select

from alignloop.errors import UserError
from alignloop.feedback.db import Round, open_db
from alignloop.feedback.tasks import win_rates


def human_win_rates(db_url: str, round_name: str | None = None) -> list[dict]:
    """Blind side-by-side win rates per round and model pair from the feedback database."""
    session = open_db(db_url, upgrade=False)
    with session() as db:
        query = select(Round).order_by(Round.id)
        if round_name:
            query = query.where(Round.name == round_name)
        rounds = db.scalars(query).all()
        if round_name and not rounds:
            raise UserError(f"--feedback-round: no round named {round_name!r} in {db_url}")
        return [{"round": rnd.name, **row} for rnd in rounds for row in win_rates(db, rnd)]
