"""Reading the HTML forms into what the service layer takes."""

from __future__ import annotations

import json
from typing import Any

from fastapi import HTTPException
from starlette.datastructures import FormData

from alignloop.feedback import tasks
from alignloop.feedback.web.middleware import MAX_BODY_BYTES


def label_from_form(form: FormData) -> dict[str, Any]:
    """The label payload from the HTML form: rank_<cid> (1 = best), rate_<cid>_<criterion>,
    flag_<cid> (repeated), comment, and action=skip."""
    if form.get("action") == "skip":
        return {"skip": True, "comment": str(form.get("comment", ""))}
    ranks, ratings, flags = {}, {}, []
    for key, value in form.multi_items():
        parts = key.split("_", 2)
        try:
            if parts[0] == "rank" and len(parts) == 2:
                ranks[int(parts[1])] = int(value)
            elif parts[0] == "rate" and len(parts) == 3 and value != "":
                ratings.setdefault(int(parts[1]), {})[parts[2]] = float(value)
            elif parts[0] == "flag" and len(parts) == 2:
                flags.append({"candidate_id": int(parts[1]), "kind": str(value)})
        except ValueError:
            raise tasks.Invalid(f"{key}: not a number") from None
    if sorted(ranks.values()) != list(range(1, len(ranks) + 1)):
        raise tasks.Invalid("ranking: give each response a different rank from 1 (best) to "
                            f"{len(ranks)}")
    ranking = sorted(ranks, key=ranks.get)
    return {"ranking": ranking, "ratings": ratings, "flags": flags, "comment": str(form.get("comment", ""))}


def parse_criteria(text: str) -> list[dict[str, Any]]:
    """``name:min-max:guideline`` per line, e.g. ``relevance:1-7:Does it answer the question?``."""
    out = []
    for n, line in enumerate(text.strip().splitlines(), 1):
        name, _, rest = line.strip().partition(":")
        scale, _, guideline = rest.partition(":")
        lo, _, hi = scale.partition("-")
        try:
            out.append({"name": name.strip(), "min": int(lo), "max": int(hi), "guideline": guideline.strip()})
        except ValueError:
            raise tasks.Invalid(f"criteria line {n}: write name:min-max:guideline") from None
    return out


def parse_jsonl_upload(data: bytes) -> list[dict[str, Any]]:
    if len(data) > MAX_BODY_BYTES:
        raise HTTPException(413, "file too large")
    items = []
    for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise tasks.Invalid(f"upload line {n}: not JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise tasks.Invalid(f"upload line {n}: expected an object with 'prompt' and 'responses'")
        items.append(item)
    return items
