"""The demo world: a small procedurally generated world of coloured animals doing things in places,
with a hidden "gold" judgement of answers about it and simulated annotators who label from it.

Everything is pure Python, seeded, and byte-identical for the same seed (no hash ordering, clock or
environment), so tests, benchmarks and the demo can rebuild exactly the same data.

Prompts ask about entities of the world, e.g. "Describe the red fox that sings in the forest."
Each requested entity has a category: colour, animal, action (any of its verb forms) or place.

Gold scores (each in [0, 1]; computed from the text alone, prompt and response):

* relevance   = share of the requested entities the response mentions, minus 0.2 for every other
                animal it brings in (clipped to [0, 1]).
* consistency = 1 - 0.25 x conflicting attributes (a second colour or a second place besides the
                requested one, or two of them when none was requested) - 0.2 x repeated sentences
                - 0.1 x immediately repeated words (clipped to [0, 1]), scaled down for responses
                under 8 words (x words / 8) and by fluency (below).
* creativity  = (half from distinct descriptive adjectives, saturating at 4; half from distinct
                content words that are not in the prompt, saturating at 16)
                x length factor x (1 - share of the response's word 4-grams copied from the prompt).
                x fluency. The length factor is a sweet spot: it rises linearly to 1 at 12 words, stays
                1 up to 48 words and falls linearly to 0 at 96 words.
* fluency     = min(1, 2 x share of the words that belong to the world's lexicon): ordinary English
                about the world keeps it at 1; a random model's fragments of words drive it to 0.

gold_total = 0.5 relevance + 0.3 consistency + 0.2 creativity.

Because every term saturates or turns down (adjectives past 4, new words past 16, length past 48
words) while a learned reward model only sees rankings of the responses it was shown, a policy
optimised hard against that reward model can keep pushing what the reward model liked — more
adjectives, longer answers, more repeated praise — past the point where gold stops rising and
starts to fall: reward over-optimisation, visible in the report as gold falling while reward rises.

Simulated annotators see a gold judgement on the rating scale (``gold_ratings`` here, or any other
gold function) through per-annotator bias (a shift in rating points per criterion) and Gaussian noise,
and produce a ranking of K responses (by their weighting of the criteria) and ratings per criterion.
Each draws from its own seeded random stream, so the same annotators labelling the same tasks in the
same order give the same labels; ``alignloop.feedback.simulate`` drives them through the labelling
app's HTTP API.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from alignloop.errors import UserError
from alignloop.runs import atomic_write_text

CRITERIA = ("relevance", "consistency", "creativity")
GOLD_WEIGHTS = {"relevance": 0.5, "consistency": 0.3, "creativity": 0.2}

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "golden",
           "grey", "pink"]
ANIMALS = ["fox", "owl", "cat", "dog", "rabbit", "bear", "horse", "frog", "deer", "wolf", "duck", "goat",
           "mouse", "otter"]
# (base, third person, -ing): any form counts as mentioning the action.
ACTIONS = [("sing", "sings", "singing"), ("dance", "dances", "dancing"), ("sleep", "sleeps", "sleeping"),
           ("read", "reads", "reading"), ("swim", "swims", "swimming"), ("paint", "paints", "painting"),
           ("cook", "cooks", "cooking"), ("jump", "jumps", "jumping"), ("hide", "hides", "hiding"),
           ("climb", "climbs", "climbing"), ("fish", "fishes", "fishing"), ("whistle", "whistles", "whistling"),
           ("knit", "knits", "knitting"), ("dig", "digs", "digging")]
PLACES = ["forest", "river", "garden", "castle", "meadow", "village", "cave", "market", "library", "beach",
          "orchard", "mountain", "harbour", "bakery"]
ADJECTIVES = ["fluffy", "gentle", "brave", "curious", "tiny", "clever", "sleepy", "cheerful", "shy", "proud",
              "quiet", "nimble", "patient", "playful", "graceful", "wise", "bold", "cozy", "merry", "grumpy",
              "elegant", "sturdy", "lively", "calm"]
PARTS = ["eyes", "ears", "paws", "whiskers", "feet"]
PART = ["tail", "coat", "voice", "nose", "hat", "scarf"]
FOODS = ["berries", "apples", "honey", "carrots", "bread", "cheese", "mushrooms", "seeds", "clover", "plums"]
LANDMARKS = ["old oak", "stone bridge", "painted door", "tall tower", "quiet pond", "wooden fence", "mossy rock",
             "bell tower", "round well", "broken cart"]
TIMES = ["every morning", "at dusk", "on rainy days", "at midnight", "each spring", "after lunch",
         "before dawn", "on holidays"]
FRIENDS = ["a kind baker", "the old miller", "two children", "a travelling poet", "a retired captain",
           "a lost sailor"]
STOPWORDS = set("""a an the and or but of in on at to by for with from near it its is was are be has have had
that this who what which does do did there their they them he she his her as so very not every each
into over under about like than then when while one two some any all""".split())

PROMPT_TEMPLATES = [
    ("Describe the {colour} {animal} that {act3} in the {place}.", ("colour", "animal", "action", "place")),
    ("Tell me about the {colour} {animal} in the {place}.", ("colour", "animal", "place")),
    ("Write a short story about a {colour} {animal} who {act3} near the {place}.",
     ("colour", "animal", "action", "place")),
    ("What does the {colour} {animal} do in the {place}?", ("colour", "animal", "place")),
    ("Describe a {animal} that loves {acting}.", ("animal", "action")),
    ("Tell a tale of the {animal} from the {place}.", ("animal", "place")),
    ("Who is the {colour} {animal}?", ("colour", "animal")),
    ("Write about a {colour} {animal} {acting} by the {place}.", ("colour", "animal", "action", "place")),
    ("Tell me a story about the {animal} who {act3} in the {place}.", ("animal", "action", "place")),
    ("Describe the {colour} {animal} and what it does.", ("colour", "animal")),
]

# Every word the world's own texts use. A response whose words mostly fall outside it is noise
# (a random model's byte soup), not a consistent or creative answer; see _fluency.
RESPONSE_WORDS = """far away creature lives has eats by friend who finds kind likes happy nobody seen like before
people call visits sometimes an"""
LEXICON = frozenset(
    [*COLOURS, *ANIMALS, *(f for forms in ACTIONS for f in forms), *PLACES, *ADJECTIVES, *PARTS, *PART, *FOODS]
    + " ".join(LANDMARKS + TIMES + FRIENDS + [t for t, _ in PROMPT_TEMPLATES]).lower().split()
    + RESPONSE_WORDS.split() + sorted(STOPWORDS))

_WORD = re.compile(r"[a-z]+")
_SENTENCE = re.compile(r"[^.!?]+[.!?]?")
_ACTION_FORM = {form: base for base, *forms in ACTIONS for form in (base, *forms)}


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


# ---------------------------------------------------------------- gold judgement


def requested_entities(prompt: str) -> dict[str, str]:
    """The world entities a prompt asks about, by category (first mention of each category wins)."""
    found: dict[str, str] = {}
    for w in words(prompt):
        for cat, value in _categorise(w):
            found.setdefault(cat, value)
    return found


def _categorise(word: str) -> list[tuple[str, str]]:
    out = []
    if word in COLOURS:
        out.append(("colour", word))
    if word in ANIMALS:
        out.append(("animal", word))
    if word in _ACTION_FORM:
        out.append(("action", _ACTION_FORM[word]))
    if word in PLACES:
        out.append(("place", word))
    return out


def _mentions(ws: list[str]) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {"colour": set(), "animal": set(), "action": set(), "place": set()}
    for w in ws:
        for cat, value in _categorise(w):
            seen[cat].add(value)
    return seen


def _length_factor(n: int) -> float:
    if n < 12:
        return n / 12
    if n <= 48:
        return 1.0
    return max(0.0, 1.0 - (n - 48) / 48)


def _fluency(ws: list[str]) -> float:
    """1 when at least half the words are words of the world (ordinary English about it passes easily:
    function words alone are a third of it), falling to 0 for text made of none of them."""
    known = sum(w in LEXICON for w in ws) / len(ws)
    return min(1.0, 2 * known)


def _ngrams(ws: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]


def gold_scores(prompt: str, response: str) -> dict[str, float]:
    """The hidden judgement of ``response`` to ``prompt``: relevance, consistency, creativity in [0, 1]."""
    ws = words(response)
    if not ws:
        return dict.fromkeys(CRITERIA, 0.0)
    asked = requested_entities(prompt)
    seen = _mentions(ws)

    hits = sum(value in seen[cat] for cat, value in asked.items())
    coverage = hits / len(asked) if asked else 1.0
    other_animals = len(seen["animal"] - {asked.get("animal")}) if "animal" in asked else 0
    relevance = min(1.0, max(0.0, coverage - 0.2 * other_animals))

    conflicts = 0
    for cat in ("colour", "place"):
        extra = seen[cat] - {asked[cat]} if cat in asked else seen[cat]
        conflicts += len(extra) if cat in asked else max(0, len(extra) - 1)
    sentences = [" ".join(words(s)) for s in _SENTENCE.findall(response)]
    sentences = [s for s in sentences if s]
    repeated_sentences = len(sentences) - len(set(sentences))
    stutters = sum(a == b for a, b in zip(ws, ws[1:], strict=False))
    # A few words cannot contradict themselves, but they are not a consistent account either.
    consistency = min(1.0, max(0.0, 1.0 - 0.25 * conflicts - 0.2 * repeated_sentences - 0.1 * stutters))
    consistency *= min(1.0, len(ws) / 8) * _fluency(ws)

    prompt_words = set(words(prompt))
    adjectives = len(set(ws) & set(ADJECTIVES))
    novel = len({w for w in ws if w not in prompt_words and w not in STOPWORDS})
    grams = _ngrams(ws, 4)
    prompt_grams = set(_ngrams(words(prompt), 4))
    copied = sum(g in prompt_grams for g in grams) / len(grams) if grams else 0.0
    base = 0.5 * min(adjectives / 4, 1.0) + 0.5 * min(novel / 16, 1.0)
    creativity = base * _length_factor(len(ws)) * (1.0 - copied) * _fluency(ws)
    return {"relevance": relevance, "consistency": consistency, "creativity": creativity}


def gold_total(prompt: str, response: str) -> float:
    """Weighted sum of the gold scores (GOLD_WEIGHTS), in [0, 1]."""
    scores = gold_scores(prompt, response)
    return sum(GOLD_WEIGHTS[c] * scores[c] for c in CRITERIA)


def gold_breakdown(prompt: str, response: str) -> dict[str, float]:
    """The three gold scores and their weighted "total" (what ``alignloop eval --gold`` reports)."""
    scores = gold_scores(prompt, response)
    return {**scores, "total": sum(GOLD_WEIGHTS[c] * scores[c] for c in CRITERIA)}


def gold_ratings(prompt: str, response: str) -> dict[str, float]:
    """The gold scores on the 1-7 rating scale (1 + 6 x score): the judgement simulated annotators
    perturb with their bias and noise before rounding to a rating."""
    return {c: 1 + 6 * v for c, v in gold_scores(prompt, response).items()}


# ---------------------------------------------------------------- prompts


def _stable_int(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def sample_prompt(rng: random.Random) -> str:
    template, _ = rng.choice(PROMPT_TEMPLATES)
    base, act3, acting = rng.choice(ACTIONS)
    return template.format(colour=rng.choice(COLOURS), animal=rng.choice(ANIMALS), place=rng.choice(PLACES),
                           act3=act3, acting=acting)


def is_eval_prompt(text: str) -> bool:
    """One prompt in eight (by a stable hash of its text) is held out for evaluation only."""
    return _stable_int("eval-split", text) % 8 == 0


def _prompts(n: int, seed: int, held_out: bool, salt: str) -> list[str]:
    rng = random.Random(_stable_int(salt, seed))
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(n * 200):
        if len(out) == n:
            break
        p = sample_prompt(rng)
        if p in seen or is_eval_prompt(p) != held_out:
            continue
        seen.add(p)
        out.append(p)
    return out


def rl_prompts(n: int = 256, seed: int = 0) -> list[dict]:
    """``{"prompt"}`` records for PPO and candidate collection; never an evaluation prompt."""
    return [{"prompt": p} for p in _prompts(n, seed, held_out=False, salt="rl")]


def eval_prompts(n: int = 64, seed: int = 0) -> list[dict]:
    """Held-out ``{"prompt"}`` records, disjoint from every training / RL prompt of any seed."""
    return [{"prompt": p} for p in _prompts(n, seed, held_out=True, salt="eval")]


# ---------------------------------------------------------------- responses


@dataclass(frozen=True)
class Style:
    """How a generated response goes right or wrong; the gold scores follow from the text it yields."""

    cover: float = 1.0          # chance of mentioning each requested entity
    conflicts: int = 0          # sentences giving a second colour or place
    repeats: int = 0            # sentences said twice
    adjectives: int = 3         # descriptive adjectives used
    sentences: int = 3          # detail sentences after the opening one
    other_animals: int = 0      # unrelated animals brought in


def random_style(rng: random.Random, quality: float) -> Style:
    """A style whose expected gold rises with ``quality`` in [0, 1], with plenty of spread."""
    q = min(1.0, max(0.0, quality + rng.gauss(0, 0.15)))
    return Style(
        cover=0.35 + 0.65 * q,
        conflicts=int(rng.random() < 0.6 * (1 - q)) + int(rng.random() < 0.3 * (1 - q)),
        repeats=int(rng.random() < 0.5 * (1 - q)),
        adjectives=max(0, round(4 * q + rng.gauss(0, 1))),
        sentences=rng.randint(1, 2) + round(3 * q * rng.random()) + int(rng.random() < 0.15) * 5,
        other_animals=int(rng.random() < 0.4 * (1 - q)),
    )


def write_response(rng: random.Random, prompt: str, style: Style) -> str:
    asked = requested_entities(prompt)
    keep = {cat: v for cat, v in asked.items() if rng.random() < style.cover}
    animal = keep.get("animal") or asked.get("animal") or rng.choice(ANIMALS)
    name = animal if "animal" in keep else "creature"
    adjs = rng.sample(ADJECTIVES, min(style.adjectives, len(ADJECTIVES)))

    def adj() -> str:
        return adjs.pop() + " " if adjs else ""

    colour = keep.get("colour", "")
    verb = dict((b, t) for b, t, _ in ACTIONS).get(keep.get("action", ""), "lives")
    opening = f"The {adj()}{colour + ' ' if colour else ''}{name} {verb}"
    opening += f" in the {keep['place']}." if "place" in keep else " far away."
    body = [opening]
    def described(what: str) -> str:  # "clever" + " and kind" -> "clever and kind"; nothing -> "kind"
        a = adj().strip()
        return f"{a} and {what}" if a else what

    details = [
        lambda: f"It has {adj()}{rng.choice(PARTS)} and a {adj()}{rng.choice(PART)}.",
        lambda: f"{rng.choice(TIMES).capitalize()} it eats {rng.choice(FOODS)} by the {rng.choice(LANDMARKS)}.",
        lambda: f"Its friend is {rng.choice(FRIENDS)}, who finds it {described('kind')}.",
        lambda: f"The {name} likes {rng.choice(FOODS)} and is {described('happy')}.",
        lambda: f"Nobody has seen a {adj()}{name} like it before.",
    ]
    for _ in range(style.sentences):
        body.append(rng.choice(details)())
    while adjs:  # use every adjective the style asked for
        body.append(f"People call it {adjs.pop()}.")
    for _ in range(style.conflicts):
        if rng.random() < 0.5:
            wrong = rng.choice([c for c in COLOURS if c != asked.get("colour")])
            body.insert(rng.randint(1, len(body)), f"The {name} is {wrong}.")
        else:
            wrong = rng.choice([p for p in PLACES if p != asked.get("place")])
            body.insert(rng.randint(1, len(body)), f"It lives in the {wrong}.")
    for _ in range(style.other_animals):
        other = rng.choice([a for a in ANIMALS if a != animal])
        article = "An" if other[0] in "aeiou" else "A"
        body.insert(rng.randint(1, len(body)), f"{article} {other} visits it sometimes.")
    for _ in range(style.repeats):
        body.insert(rng.randint(1, len(body)), rng.choice(body))
    return " ".join(body)


def candidate_responses(prompt: str, k: int, seed: int) -> list[str]:
    """K responses of spread-out quality to one prompt (for reward-model data and tests)."""
    rng = random.Random(_stable_int("candidates", seed, prompt))
    return [write_response(rng, prompt, random_style(rng, rng.random())) for _ in range(k)]


# ---------------------------------------------------------------- data sets


def pretraining_corpus(n: int = 4000, seed: int = 0, with_question: float = 0.8) -> list[dict]:
    """``{"text"}`` records for the tiny base model: descriptions of the world of every quality, most of
    them preceded by the question they answer. Seeing questions and answers together is what teaches a
    tiny model, in a minute of training, to take the animal, colour and place from the question."""
    rng = random.Random(_stable_int("corpus", seed))
    out = []
    for _ in range(n):
        prompt = sample_prompt(rng)
        style = random_style(rng, rng.random())
        if rng.random() < with_question:
            # Answers in the corpus always name what was asked (their other faults vary), so every
            # question-answer pair carries the same copying signal.
            out.append({"text": f"{prompt} {write_response(rng, prompt, replace(style, cover=1.0))}"})
        else:
            out.append({"text": write_response(rng, prompt, style)})
    return out


def sft_records(n: int = 1000, seed: int = 0) -> list[dict]:
    """``{"prompt", "completion"}`` demonstrations: decent but imperfect (quality around 0.6), so SFT
    gives a reasonable starting policy and RLHF has room to improve on it."""
    prompts = _prompts(n, seed, held_out=False, salt="sft")
    rng = random.Random(_stable_int("sft", seed))
    return [{"prompt": p, "completion": " " + write_response(rng, p, random_style(rng, 0.6))}
            for p in prompts]


def preference_pairs(n: int = 512, seed: int = 0) -> list[dict]:
    """``{"prompt", "chosen", "rejected"}`` by gold_total (ties skipped), for reward-model tests."""
    out = []
    for p in _prompts(n, seed, held_out=False, salt="pairs"):
        a, b = candidate_responses(p, 2, seed)
        ga, gb = gold_total(p, a), gold_total(p, b)
        if ga != gb:
            chosen, rejected = (a, b) if ga > gb else (b, a)
            out.append({"prompt": p, "chosen": chosen, "rejected": rejected})
    return out


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def write_demo_data(out_dir: str | Path, seed: int = 0, corpus: int = 4000, sft: int = 1000, rl: int = 256,
                    evaluation: int = 64) -> dict[str, Path]:
    """Write the demo's data files: corpus.jsonl, sft.jsonl, rl_prompts.jsonl, eval_prompts.jsonl."""
    out = Path(out_dir)
    return {
        "corpus": write_jsonl(out / "corpus.jsonl", pretraining_corpus(corpus, seed)),
        "sft": write_jsonl(out / "sft.jsonl", sft_records(sft, seed)),
        "rl_prompts": write_jsonl(out / "rl_prompts.jsonl", rl_prompts(rl, seed)),
        "eval_prompts": write_jsonl(out / "eval_prompts.jsonl", eval_prompts(evaluation, seed)),
    }


# ---------------------------------------------------------------- benchmark items (examples/benchmarks)


def _plain_answer(entities: dict[str, str]) -> str:
    """The one-sentence answer that names exactly the given entities: "The red fox sings in the forest."."""
    colour = entities.get("colour")
    act3 = {base: third for base, third, _ in ACTIONS}.get(entities.get("action", ""), "lives")
    place = entities.get("place")
    return (f"The {colour + ' ' if colour else ''}{entities.get('animal', 'creature')} {act3}"
            + (f" in the {place}." if place else " far away."))


def benchmark_choice_items(n: int = 200, seed: int = 0, choices: int = 4) -> list[dict]:
    """``{"question", "choices", "answer"}`` multiple-choice items on held-out prompts: one plain answer
    names what the prompt asked about; in each of the others one asked-for entity (the same category for
    every choice of an item) is swapped for another of its kind. Scored by log-likelihood, it measures
    the relevance the gold judgement rewards, without generating."""
    options = {"colour": COLOURS, "animal": ANIMALS, "action": [base for base, *_ in ACTIONS], "place": PLACES}
    rng = random.Random(_stable_int("benchmark-choice", seed))
    items = []
    for prompt in _prompts(n, seed, held_out=True, salt="benchmark-choice"):
        asked = requested_entities(prompt)
        category = rng.choice(sorted(asked))
        wrong = rng.sample([v for v in options[category] if v != asked[category]], choices - 1)
        texts = [_plain_answer({**asked, category: value}) for value in [asked[category], *wrong]]
        answer = rng.randrange(choices)
        texts.insert(answer, texts.pop(0))
        items.append({"question": prompt, "choices": texts, "answer": answer})
    return items


def benchmark_count_items(n: int = 200, seed: int = 0) -> list[dict]:
    """``{"question", "answer"}`` word problems about the world whose answer is one whole number (sums
    and differences of numbers below 10), for a generate-until task scored by exact match."""
    countable = [f for f in FOODS if f not in ("honey", "bread", "cheese", "clover")]
    givers = [f for f in FRIENDS if not f.startswith("two ")]
    rng = random.Random(_stable_int("benchmark-count", seed))
    items = []
    for _ in range(n):
        colour, animal, food = rng.choice(COLOURS), rng.choice(ANIMALS), rng.choice(countable)
        place, time = rng.choice(PLACES), rng.choice(TIMES[:4])
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        if rng.random() < 0.5:
            question = (f"The {colour} {animal} eats {a} {food} in the {place} and {b} more {time}. "
                        f"How many {food} does the {animal} eat?")
            answer = a + b
        else:
            a, b = max(a, b), min(a, b)
            question = (f"{rng.choice(givers).capitalize()} gives the {colour} {animal} {a} {food} in the "
                        f"{place}. It eats {b} of them. How many {food} are left?")
            answer = a - b
        items.append({"question": question, "answer": str(answer)})
    return items


def write_benchmark_data(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the data files of the local lm-evaluation-harness tasks in examples/benchmarks."""
    out = Path(out_dir)
    return {
        "choice": write_jsonl(out / "demo_world_choice.jsonl", benchmark_choice_items(200, seed)),
        "count": write_jsonl(out / "demo_world_count.jsonl", benchmark_count_items(200, seed)),
        "count_fewshot": write_jsonl(out / "demo_world_count_fewshot.jsonl", benchmark_count_items(16, seed + 1)),
    }


# ---------------------------------------------------------------- simulated annotators

GoldFn = Callable[[str, str], dict[str, float]]


@dataclass
class Judgement:
    ranking: list[int]               # indices of the responses, best first
    ratings: list[dict[str, float]]  # per response: criterion -> rating, rounded and clipped to its scale


@dataclass
class Annotator:
    """A simulated person. They judge with a hidden gold function ``gold(prompt, response) -> {criterion:
    score on the rating scale}``, seen through their own per-criterion ``bias`` (given, or drawn once per
    criterion from N(0, bias_scale) on first use) and Gaussian ``noise`` (rating points), and order the
    responses by the ``weights`` of the criteria (None: counted equally). With ``skip_rate`` they skip
    a task now and then. Every draw comes from their own random stream, seeded by ``seed``."""

    name: str
    gold: GoldFn = gold_ratings
    noise: float = 0.5
    bias: dict[str, float] = field(default_factory=dict)
    bias_scale: float = 0.0
    weights: dict[str, float] | None = None
    seed: int = 0
    skip_rate: float = 0.0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def judge(self, prompt: str, responses: Sequence[str], scales: dict[str, tuple[float, float]]) -> Judgement | None:
        """Rank and rate the responses on the criteria of ``scales`` (criterion -> (min, max) rating);
        None when the annotator skips the task."""
        if self.skip_rate and self.rng.random() < self.skip_rate:
            return None
        noisy: list[dict[str, float]] = []
        for text in responses:
            gold = self.gold(prompt, text)
            for k in gold:
                if k not in self.bias:
                    self.bias[k] = self.rng.gauss(0.0, self.bias_scale)
            noisy.append({k: v + self.bias[k] + self.rng.gauss(0.0, self.noise) for k, v in gold.items() if k in scales})
        ranking = sorted(range(len(noisy)), key=lambda i: -self.overall(noisy[i]))
        ratings = [{k: float(min(scales[k][1], max(scales[k][0], round(v)))) for k, v in scores.items()}
                   for scores in noisy]
        return Judgement(ranking, ratings)

    def overall(self, scores: dict[str, float]) -> float:
        """The overall judgement that orders the responses: the weighted mean of the criteria scores."""
        weights = self.weights or dict.fromkeys(scores, 1.0)
        missing = sorted(set(scores) - set(weights))
        if missing:
            raise UserError(f"simulated annotator weights {weights} give no weight to criterion {missing[0]!r}")
        return sum(weights[k] * v for k, v in scores.items()) / (sum(weights[k] for k in scores) or 1.0)


def make_annotators(names: Sequence[str], gold: GoldFn = gold_ratings, noise: float = 0.5, bias_scale: float = 0.5,
                    seed: int = 0, skip_rate: float = 0.0, weights: dict[str, float] | None = None) -> list[Annotator]:
    """One annotator per name, each with its own seeded bias (N(0, bias_scale) per criterion); all rank
    by the same criterion ``weights`` (None = equally)."""
    return [Annotator(name, gold, noise=noise, bias_scale=bias_scale, weights=weights, seed=seed * 1000 + i,
                      skip_rate=skip_rate) for i, name in enumerate(names)]
