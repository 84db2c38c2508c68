"""Inter-annotator agreement: Kendall's tau on rankings (scipy), Krippendorff's alpha on ratings
(the ``krippendorff`` package, interval level) and each annotator's agreement with gold items."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from alignloop.feedback.db import Label, Prompt, Rating, Round, User


def ranking_tau(a: list[int], b: list[int]) -> float | None:
    """Kendall's tau between two rankings (candidate ids best first) of the same candidates."""
    from scipy.stats import kendalltau

    if len(a) < 2 or sorted(a) != sorted(b):
        return None
    pos_b = {c: i for i, c in enumerate(b)}
    tau = kendalltau(list(range(len(a))), [pos_b[c] for c in a]).statistic
    return None if math.isnan(tau) else float(tau)


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
    import krippendorff

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
        paired = (~np.isnan(data)).sum(axis=0) >= 2
        values = data[:, paired]
        if len(users) < 2 or not paired.any() or np.nanstd(values) == 0:
            out[crit] = None  # alpha is undefined without paired, varying values
            continue
        out[crit] = float(krippendorff.alpha(reliability_data=values, level_of_measurement="interval"))
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
