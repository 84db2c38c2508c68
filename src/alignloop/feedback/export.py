"""Export a round's labels in the reward-model stage's record formats (DESIGN.md "Data records").

Formats
- ``rankings``: ``{"prompt", "responses": [...], "ranking": [best .. worst indices]}``; equal
  aggregate positions are written as a tie group (a nested list), which forms no pair.
- ``pairs``: ``{"prompt", "chosen", "rejected"}``.
- ``ratings``: ``{"prompt", "response", "scores": {criterion: value}}``.
- ``unpaired``: ``{"prompt", "completion", "label": true | false}`` (TRL's unpaired preference format, what
  ``alignloop dpo`` trains KTO on): of each ranking the candidates that lose no comparison (the best, or
  the best tie group) are desirable and those that win none (the worst) undesirable; middle ranks, and an
  item whose candidates all tie, give nothing. Ratings are not turned into labels here: export them as
  ``ratings`` and KTO reads them against ``dpo.kto_threshold``.
A chat prompt (an item stored with its messages) is written as its message list, and in pairs (and
unpaired examples) the responses as one assistant message each: TRL's conversational preference format, so consumers can
apply their chat template. Plain prompts stay plain text.

Aggregation of overlapping labels (several people labelled the same item):
- rankings: Borda rule. Each label gives every candidate its position (0 = best); candidates are
  ordered by their mean position over the labels; exactly equal means form a tie.
- pairs: majority rule. For every two candidates, a pair is written when more labels put one
  above the other than the reverse; an even split writes no pair.
- ratings: the mean of the values given for each candidate and criterion.
With ``per_annotator=True`` nothing is aggregated: one record per label, with an ``"annotator"`` field.

Left out unless asked: skipped tasks carry no judgement and never appear; a candidate that anyone
flagged ``unsafe`` is removed from the item (``include_unsafe=True`` keeps it); an item left with
fewer than two candidates gives no ranking or pair.

Reviews of policy (PPO) samples: per sample the majority decision of its reviewers (approve /
flag; an even split counts as neither). For each prompt every approved sample is written above every
flagged one: as pairs (chosen = approved) and as two-response rankings, so reviewers' judgements
reach the next round's reward model whichever format it trains on. As unpaired examples every sample
with a majority decision is one: approved desirable, flagged undesirable (no flagged partner needed).
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from alignloop.errors import UserError
from alignloop.feedback.db import Candidate, Label, Prompt, Review, Round, User, open_db
from alignloop.feedback.tasks import NotFound, get_round
from alignloop.runs import atomic_write_text

FORMATS = ("rankings", "pairs", "ratings", "unpaired")


def borda(rankings: list[list[int]], candidates: list[int]) -> list[int | list[int]]:
    """Aggregate rankings (candidate ids best first) into indices of ``candidates``, ties nested."""
    pos = {c: np.mean([r.index(c) for r in rankings]) for c in candidates}
    order = sorted(range(len(candidates)), key=lambda i: (pos[candidates[i]], i))
    out: list[int | list[int]] = []
    for _, group in itertools.groupby(order, key=lambda i: pos[candidates[i]]):
        g = list(group)
        out.append(g[0] if len(g) == 1 else g)
    return out


def _restrict(ranking: list[int], keep: list[int]) -> list[int]:
    return [c for c in ranking if c in keep]


def prompt_field(prompt: Prompt) -> str | list[dict[str, str]]:
    """The record's ``prompt``: the chat messages of a chat prompt, else the text."""
    return prompt.messages if prompt.messages is not None else prompt.text


def pair_record(prompt: Prompt, chosen: str, rejected: str, **extra: Any) -> dict[str, Any]:
    """A preference pair; for a chat prompt in TRL's conversational form (each response an assistant turn)."""
    return {"prompt": prompt_field(prompt), "chosen": response_field(prompt, chosen),
            "rejected": response_field(prompt, rejected), **extra}


def response_field(prompt: Prompt, text: str) -> str | list[dict[str, str]]:
    """A response as written beside ``prompt_field``: one assistant message after a chat prompt."""
    return text if prompt.messages is None else [{"role": "assistant", "content": text}]


def unpaired_record(prompt: Prompt, completion: str, desirable: bool, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt_field(prompt), "completion": response_field(prompt, completion), "label": desirable,
            **extra}


def _item_records(fmt: str, prompt: Prompt, labels: list[Label], names: dict[int, str],
                  include_unsafe: bool, per_annotator: bool) -> list[dict[str, Any]]:
    cands = [c for c in prompt.candidates if c.kind == "candidate"]
    unsafe = {f.candidate_id for lb in labels for f in lb.flags if f.kind == "unsafe"}
    keep = [c.id for c in cands if include_unsafe or c.id not in unsafe]
    text = {c.id: c.text for c in cands}
    groups = [[lb] for lb in labels] if per_annotator else [labels]
    out: list[dict[str, Any]] = []
    for group in groups:
        extra = {"annotator": names[group[0].user_id]} if per_annotator else {}
        rankings = [_restrict(lb.ranking, keep) for lb in group]
        if fmt == "rankings" and len(keep) >= 2:
            out.append({"prompt": prompt_field(prompt), "responses": [text[c] for c in keep],
                        "ranking": borda(rankings, keep), **extra})
        elif fmt == "unpaired" and len(keep) >= 2:
            tiers = [g if isinstance(g, list) else [g] for g in borda(rankings, keep)]
            if len(tiers) > 1:  # all candidates tied: nobody judged one better
                out += [unpaired_record(prompt, text[keep[i]], True, **extra) for i in tiers[0]]
                out += [unpaired_record(prompt, text[keep[i]], False, **extra) for i in tiers[-1]]
        elif fmt == "pairs" and len(keep) >= 2:
            for a, b in itertools.combinations(keep, 2):
                a_wins = sum(r.index(a) < r.index(b) for r in rankings)
                b_wins = len(rankings) - a_wins
                if a_wins != b_wins:
                    chosen, rejected = (a, b) if a_wins > b_wins else (b, a)
                    out.append(pair_record(prompt, text[chosen], text[rejected], **extra))
        elif fmt == "ratings":
            values: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
            for lb in group:
                for r in lb.ratings:
                    if r.candidate_id in keep:
                        values[r.candidate_id][r.criterion].append(r.value)
            for cid in keep:
                if values.get(cid):
                    scores = {k: float(np.mean(v)) for k, v in sorted(values[cid].items())}
                    out.append({"prompt": prompt_field(prompt), "response": text[cid], "scores": scores, **extra})
    return out


def _review_records(fmt: str, db: Session, rnd: Round) -> list[dict[str, Any]]:
    if fmt == "ratings":
        return []
    rows = db.execute(select(Candidate, Review.decision).join(Review, Review.candidate_id == Candidate.id)
                      .join(Prompt, Prompt.id == Candidate.prompt_id)
                      .where(Prompt.round_id == rnd.id, Candidate.kind == "policy")
                      .order_by(Candidate.id)).all()
    votes: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    samples: dict[int, Candidate] = {}
    for cand, decision in rows:
        samples[cand.id] = cand
        votes[cand.id][0 if decision == "approve" else 1] += 1
    # Keyed by prompt text: PPO samples of the same prompt may arrive as separate uploads.
    approved: dict[str, list[Candidate]] = defaultdict(list)
    flagged: dict[str, list[Candidate]] = defaultdict(list)
    for cid, (yes, no) in votes.items():
        if yes != no:
            (approved if yes > no else flagged)[samples[cid].prompt.text].append(samples[cid])
    if fmt == "unpaired":
        return [unpaired_record(c.prompt, c.text, desirable, source="review") for desirable, by_text in ((True, approved),
                                                                                         (False, flagged))
                for text in sorted(by_text) for c in by_text[text]]
    out = []
    for text in sorted(approved.keys() & flagged.keys()):
        for good, bad in itertools.product(approved[text], flagged[text]):
            if fmt == "pairs":
                out.append(pair_record(good.prompt, good.text, bad.text, source="review"))
            else:
                out.append({"prompt": prompt_field(good.prompt), "responses": [good.text, bad.text],
                            "ranking": [0, 1], "source": "review"})
    return out


def export_records(db: Session, rnd: Round, fmt: str, include_unsafe: bool = False,
                   per_annotator: bool = False) -> list[dict[str, Any]]:
    if fmt not in FORMATS:
        raise UserError(f"--format: must be one of {', '.join(FORMATS)} (got {fmt!r})")
    names = dict(db.execute(select(User.id, User.username)).all())
    labels = db.scalars(select(Label).join(Prompt, Prompt.id == Label.prompt_id)
                        .where(Prompt.round_id == rnd.id, Label.skipped.is_(False)).order_by(Label.id)).all()
    by_prompt: dict[int, list[Label]] = defaultdict(list)
    for lb in labels:
        by_prompt[lb.prompt_id].append(lb)
    out = []
    for pid in sorted(by_prompt):
        out += _item_records(fmt, db.get(Prompt, pid), by_prompt[pid], names, include_unsafe, per_annotator)
    return out + _review_records(fmt, db, rnd)


def to_jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def export_round(db_url: str, round_name: str, output: str | Path, fmt: str = "rankings",
                 include_unsafe: bool = False, per_annotator: bool = False) -> int:
    """Write the round's records as JSONL (atomically); returns how many were written."""

    Session_ = open_db(db_url)
    with Session_() as db:
        try:
            rnd = get_round(db, round_name)
        except NotFound as exc:
            raise UserError(f"--round: {exc}") from None
        records = export_records(db, rnd, fmt, include_unsafe, per_annotator)
    atomic_write_text(output, to_jsonl(records))
    return len(records)
