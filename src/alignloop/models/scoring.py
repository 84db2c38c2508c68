"""Scoring feedback records with a trained reward model (``alignloop score``): every record keeps its
fields and gains its normalised rewards, whatever its layout (prompt/response, pair or ranking)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from alignloop.data.formats import PreferencePair, PromptResponse, Ranking, parse_feedback, validate_record
from alignloop.data.io import Record, read_records
from alignloop.models.reward import PromptLike, RewardModel
from alignloop.runs import atomic_write_text

# Where a record's rewards go: "reward" (one response), "pair" (chosen_reward / rejected_reward) or
# "rewards" (one per response of a ranking, in the record's order).
RewardSlot = Literal["reward", "pair", "rewards"]


def scoring_inputs(rec: Record) -> tuple[list[PromptLike], list[str], RewardSlot]:
    """(prompts, responses, where to put the rewards) for one record of any feedback layout."""
    keys = rec.data.keys()
    if "response" in keys and "scores" not in keys and "score" not in keys:
        r = validate_record(PromptResponse, rec)
        return [r.prompt], [r.response], "reward"
    fb = parse_feedback(rec)
    prompt = fb.prompt if isinstance(fb.prompt, str) else [m.model_dump() for m in fb.prompt]
    if isinstance(fb, PreferencePair):
        return [prompt, prompt], [fb.chosen, fb.rejected], "pair"
    if isinstance(fb, Ranking):
        return [prompt] * len(fb.responses), list(fb.responses), "rewards"
    return [prompt], [fb.response], "reward"


def score_file(model_dir: str | Path, data: str | Path, output: str | Path, batch_size: int = 16,
               device: str | None = None) -> int:
    """Write ``data``'s records with their rewards to ``output`` (JSONL, atomically); returns how many."""
    records = read_records(data)
    inputs = [scoring_inputs(r) for r in records]  # validate everything before loading the model
    rm = RewardModel.load(model_dir, device=device)
    # One scoring pass over every response (length-grouped batches), then back to the records.
    prompts = [p for ps, _, _ in inputs for p in ps]
    responses = [r for _, rs, _ in inputs for r in rs]
    rewards = rm.score(prompts, responses, batch_size=batch_size)
    lines, at = [], 0
    for rec, (_, rs, slot) in zip(records, inputs, strict=True):
        mine, at = rewards[at : at + len(rs)], at + len(rs)
        out = dict(rec.data)
        if slot == "pair":
            out["chosen_reward"], out["rejected_reward"] = mine
        elif slot == "rewards":
            out["rewards"] = mine
        else:
            out["reward"] = mine[0]
        lines.append(json.dumps(out, ensure_ascii=False))
    atomic_write_text(Path(output), "".join(ln + "\n" for ln in lines))
    return len(records)
