"""A generated feedback world whose gold scores are known: responses are strings of words and each
criterion's gold score is how often its word occurs. A tiny decoder can learn to count, so a working
reward model must reach high pairwise accuracy; a broken objective cannot."""

from __future__ import annotations

import json
import random
from pathlib import Path

CRITERION_WORDS = {"relevance": "sun", "consistency": "moon", "creativity": "star"}
FILLER = ["the", "a", "and", "of", "to", "in", "it", "is", "was", "on"]
TOPICS = ["boats", "bread", "rivers", "music", "trees", "clocks"]
LENGTH = 10


def response(rng: random.Random) -> str:
    """LENGTH words; each criterion word appears 0-4 times, independently."""
    words = [w for w in CRITERION_WORDS.values() for _ in range(rng.randint(0, 4))]
    words += [rng.choice(FILLER) for _ in range(LENGTH - len(words))]
    rng.shuffle(words)
    return " " + " ".join(words)


def gold(text: str, criterion: str = "relevance") -> int:
    return text.split().count(CRITERION_WORDS[criterion])


def prompt(rng: random.Random) -> str:
    return f"Tell me about {rng.choice(TOPICS)}:"


def pair(rng: random.Random, criterion: str = "relevance", with_criterion: bool = False) -> dict:
    while True:
        a, b = response(rng), response(rng)
        if gold(a, criterion) != gold(b, criterion):
            break
    hi, lo = (a, b) if gold(a, criterion) > gold(b, criterion) else (b, a)
    rec = {"prompt": prompt(rng), "chosen": hi, "rejected": lo,
           "margin": float(gold(hi, criterion) - gold(lo, criterion))}
    if with_criterion:
        rec["criterion"] = criterion
    return rec


def ranking(rng: random.Random, k: int = 4) -> dict:
    """K responses ranked by gold score; equal scores are tied (a nested list)."""
    responses = [response(rng) for _ in range(k)]
    levels = sorted({gold(r) for r in responses}, reverse=True)
    order = [[i for i, r in enumerate(responses) if gold(r) == lv] for lv in levels]
    return {"prompt": prompt(rng), "responses": responses,
            "ranking": [g[0] if len(g) == 1 else g for g in order]}


def rating(rng: random.Random) -> dict:
    r = response(rng)
    return {"prompt": prompt(rng), "response": r, "scores": {c: 1 + gold(r, c) for c in CRITERION_WORDS}}


def mixed_records(n: int, seed: int) -> list[dict]:
    """Pairs (with margins), rankings of 4 with ties, and overall-score ratings, shuffled together."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 4
        if kind < 2:
            out.append(pair(rng))
        elif kind == 2:
            out.append(ranking(rng))
        else:
            r = response(rng)
            out.append({"prompt": prompt(rng), "response": r, "score": 1 + gold(r)})
    rng.shuffle(out)
    return out


def texts() -> list[str]:
    """Tokenizer corpus covering every word of this world."""
    rng = random.Random(0)
    return [prompt(rng) + response(rng) for _ in range(300)] + [f"Tell me about {t}:" for t in TOPICS]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
