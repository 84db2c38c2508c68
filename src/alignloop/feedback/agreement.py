"""Inter-annotator agreement in a round: Kendall's tau on rankings, Krippendorff's alpha on ratings
(interval level) and each annotator's agreement with gold items. The statistics themselves live in
``alignloop.stats``; this module gathers their inputs from the database."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from alignloop.feedback.db import Label, Prompt, Rating, Round, User
from alignloop.stats import interval_alpha, ranking_tau


def _labels(db: Session, rnd: Round) -> list[tuple[Label, Prompt, str]]:
    return db.execute(select(Label, Prompt, User.username).join(Prompt, Prompt.id == Label.prompt_id)
                      .join(User, User.id == Label.user_id)
                      .where(Prompt.round_id == rnd.id, Label.skipped.is_(False)).order_by(Label.id)).all()


def ranking_agreement(db: Session, rnd: Round, buckets: int = 10) -> dict[str, Any]:
    """Mean pairwise tau over items labelled by two or more people, and the same in time order."""
    by_prompt: dict[int, list[Label]] = defaultdict(list)
    for label, _prompt, _name in _labels(db, rnd):
        by_prompt[label.prompt_id].append(label)
    pairs: list[tuple[Any, float]] = []
    for labels in by_prompt.values():
        for x, y in itertools.combinations(labels, 2):
            tau = ranking_tau(x.ranking, y.ranking)
            if tau is not None:
                pairs.append((max(x.created_at, y.created_at), tau))
    pairs.sort(key=lambda p: p[0])
    series = []
    if pairs:
        size = math.ceil(len(pairs) / buckets)
        for i in range(0, len(pairs), size):
            chunk = pairs[i:i + size]
            series.append({"until": chunk[-1][0].isoformat(timespec="seconds"), "pairs": len(chunk),
                           "tau": float(np.mean([t for _, t in chunk]))})
    return {"kendall_tau": float(np.mean([t for _, t in pairs])) if pairs else None, "pairs": len(pairs),
            "over_time": series}


def rating_agreement(db: Session, rnd: Round) -> dict[str, float | None]:
    """Krippendorff's alpha (interval) per criterion: rows are annotators, columns rated candidates."""
    rows = db.execute(select(Label.user_id, Rating.candidate_id, Rating.criterion, Rating.value)
                      .join(Label, Label.id == Rating.label_id).join(Prompt, Prompt.id == Label.prompt_id)
                      .where(Prompt.round_id == rnd.id, Label.skipped.is_(False))).all()
    out: dict[str, float | None] = {}
    for crit in (c["name"] for c in rnd.criteria):
        cells = [(u, c, v) for u, c, k, v in rows if k == crit]
        users = sorted({u for u, _, _ in cells})
        units = sorted({c for _, c, _ in cells})
        data = np.full((len(users), len(units)), np.nan)
        ui, ci = {u: i for i, u in enumerate(users)}, {c: i for i, c in enumerate(units)}
        for u, c, v in cells:
            data[ui[u], ci[c]] = v
        out[crit] = interval_alpha(data)
    return out


def gold_agreement(db: Session, rnd: Round) -> dict[str, dict[str, float]]:
    """Per annotator: mean tau between their rankings and the gold ranking of gold items."""
    taus: dict[str, list[float]] = defaultdict(list)
    for label, prompt, name in _labels(db, rnd):
        if prompt.gold_ranking:
            tau = ranking_tau(label.ranking, prompt.gold_ranking)
            if tau is not None:
                taus[name].append(tau)
    return {name: {"tau": float(np.mean(v)), "items": len(v)} for name, v in sorted(taus.items())}


def agreement_report(db: Session, rnd: Round) -> dict[str, Any]:
    return {"rankings": ranking_agreement(db, rnd), "ratings_alpha": rating_agreement(db, rnd),
            "gold": gold_agreement(db, rnd)}
