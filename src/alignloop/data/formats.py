"""Record schemas (DESIGN.md "Data records") and their validation with file:line:field errors."""

from __future__ import annotations

from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from alignloop.data.io import Record
from alignloop.errors import UserError


class RecordModel(BaseModel):
    # Extra columns (ids, metadata) are fine; strict types so a number is not silently taken as text.
    model_config = ConfigDict(extra="ignore", strict=True)


class Message(RecordModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


def chat_as_lines(messages: list[dict], separator: str = "\n") -> str:
    """A conversation as plain "role: content" turns joined by ``separator``, for readers that take no
    chat template: people labelling it, the run report, and reward models with an encoder's tokenizer."""
    return separator.join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)


class PromptCompletion(RecordModel):
    prompt: str
    completion: str


class Conversation(RecordModel):
    messages: list[Message]

    @field_validator("messages")
    @classmethod
    def _has_assistant(cls, v: list[Message]) -> list[Message]:
        if not v:
            raise ValueError("must hold at least one message")
        if not any(m.role == "assistant" for m in v):
            raise ValueError("needs at least one assistant message to learn from")
        return v


class PlainText(RecordModel):
    text: str


SFTExample = PromptCompletion | Conversation | PlainText


class LabelledText(RecordModel):
    """Classification: a text and its label (a class name or an integer id)."""

    text: str
    label: str | int


class TaggedTokens(RecordModel):
    """Token tagging (e.g. NER): words and one BIO tag per word."""

    tokens: list[str]
    tags: list[str]

    @field_validator("tags")
    @classmethod
    def _one_tag_per_token(cls, v: list[str], info: ValidationInfo) -> list[str]:
        tokens = info.data.get("tokens")
        if not v:
            raise ValueError("must hold at least one tag")
        if tokens is not None and len(tokens) != len(v):
            raise ValueError(f"{len(v)} tags for {len(tokens)} tokens (one tag per token)")
        return v


class Words(RecordModel):
    """Pre-split words to tag at prediction time (tags, when present, are ignored)."""

    tokens: list[str]


M = TypeVar("M", bound=RecordModel)


def validate_record(model: type[M], rec: Record) -> M:
    try:
        return model.model_validate(rec.data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        if err["type"] == "missing":
            raise UserError(f"{rec.where}: field '{field}' is missing") from None
        got = err.get("input")
        got_type = type(got).__name__ if got is not None else "null"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"].endswith("_type"):
            msg = f"{msg} (got {got_type})"
        raise UserError(f"{rec.where}: field '{field}': {msg}") from None


def parse_sft(rec: Record) -> SFTExample:
    keys = rec.data.keys()
    if "messages" in keys:
        return validate_record(Conversation, rec)
    if "prompt" in keys or "completion" in keys:
        return validate_record(PromptCompletion, rec)
    if "text" in keys:
        return validate_record(PlainText, rec)
    found = ", ".join(sorted(map(str, keys))) or "none"
    raise UserError(
        f"{rec.where}: an SFT record needs 'prompt' and 'completion', 'messages', or 'text' (found: {found}); "
        "use data.column_map to rename columns"
    )


# ---------------------------------------------------------------- human feedback (reward modelling)

Prompt = str | list[Message]
Annotator = str | int | None


def assistant_turn_text(v: object) -> object:
    """TRL's conversational preference forms give a response as one assistant message: its text."""
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], dict) and v[0].get("role") == "assistant":
        return v[0].get("content")
    return v


class PreferencePair(RecordModel):
    prompt: Prompt
    chosen: str
    rejected: str
    margin: float | None = None
    criterion: str | None = None
    annotator: Annotator = None

    _assistant_turn = field_validator("chosen", "rejected", mode="before")(assistant_turn_text)


class UnpairedExample(RecordModel):
    """KTO's unpaired feedback (TRL's unpaired preference format): a response and whether it is desirable."""

    prompt: Prompt
    completion: str
    label: bool
    annotator: Annotator = None

    _assistant_turn = field_validator("completion", mode="before")(assistant_turn_text)


class DialoguePair(RecordModel):
    """HH-RLHF style: two full dialogues that differ only in the final assistant turn."""

    chosen: str
    rejected: str
    margin: float | None = None
    criterion: str | None = None
    annotator: Annotator = None


class Ranking(RecordModel):
    """``ranking`` lists response indices best to worst; a nested list is a tie, e.g. [2, [0, 3], 1]
    means 2 is best, 0 and 3 are equally good, 1 is worst. Tied responses form no pair."""

    prompt: Prompt
    responses: list[str]
    ranking: list[int | list[int]]
    criterion: str | None = None
    annotator: Annotator = None


class Rating(RecordModel):
    """Scores per criterion (``scores``) or one overall ``score``, on the criterion's configured scale."""

    prompt: Prompt
    response: str
    scores: dict[str, float] | None = None
    score: float | None = None
    annotator: Annotator = None


Feedback = PreferencePair | Ranking | Rating

ASSISTANT_TURN = "\n\nAssistant:"


def split_dialogues(rec: Record, chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) from two dialogues sharing everything up to the
    final assistant turn: the prompt ends at the last "\\n\\nAssistant:" inside the common prefix."""
    common = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        common += 1
    if chosen == rejected:
        common = len(chosen)
    cut = chosen.rfind(ASSISTANT_TURN, 0, common)
    if cut < 0:
        raise UserError(f"{rec.where}: 'chosen' and 'rejected' have no prompt: they share no text ending in "
                        f"{ASSISTANT_TURN.strip()!r}; give a 'prompt' field or HH-RLHF style dialogues")
    end = cut + len(ASSISTANT_TURN)
    return chosen[:end], chosen[end:], rejected[end:]


def ranking_groups(ranking: list[int | list[int]]) -> list[list[int]]:
    return [r if isinstance(r, list) else [r] for r in ranking]


def parse_feedback(rec: Record) -> Feedback:
    """A pair, an HH-RLHF dialogue pair (split into prompt and responses), a ranking or a rating."""
    keys = rec.data.keys()
    if "responses" in keys or "ranking" in keys:
        r = validate_record(Ranking, rec)
        k = len(r.responses)
        if k < 2:
            raise UserError(f"{rec.where}: field 'responses': a ranking needs at least 2 responses (got {k})")
        flat = [i for g in ranking_groups(r.ranking) for i in g]
        bad = [i for i in flat if not 0 <= i < k]
        if bad:
            raise UserError(f"{rec.where}: field 'ranking': index {bad[0]} is out of range for {k} responses "
                            f"(valid: 0..{k - 1})")
        if sorted(flat) != list(range(k)):
            raise UserError(f"{rec.where}: field 'ranking': must list each of the {k} responses exactly once "
                            f"(got {r.ranking})")
        return r
    if "response" in keys:
        r = validate_record(Rating, rec)
        if (r.scores is None) == (r.score is None):
            raise UserError(f"{rec.where}: a rating needs either 'scores' (one value per criterion) or 'score'")
        if r.scores is not None and not r.scores:
            raise UserError(f"{rec.where}: field 'scores': is empty")
        return r
    if "chosen" in keys or "rejected" in keys:
        if "prompt" in keys:
            return validate_record(PreferencePair, rec)
        d = validate_record(DialoguePair, rec)
        prompt, chosen, rejected = split_dialogues(rec, d.chosen, d.rejected)
        return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, margin=d.margin,
                              criterion=d.criterion, annotator=d.annotator)
    found = ", ".join(sorted(map(str, keys))) or "none"
    raise UserError(f"{rec.where}: a feedback record needs 'chosen'/'rejected' (a pair), 'responses'/'ranking' "
                    f"(a ranking) or 'response' with 'scores'/'score' (a rating) (found: {found}); "
                    "use data.column_map to rename columns")


class RLPromptChat(RecordModel):
    messages: list[Message]

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, v: list[Message]) -> list[Message]:
        if not v:
            raise ValueError("must hold at least one message")
        return v


class RLPromptText(RecordModel):
    prompt: str


def parse_rl_prompt(rec: Record) -> str | list[dict]:
    """An RL prompt: plain text, or chat messages (rendered later through the chat template)."""
    if "messages" in rec.data:
        return [m.model_dump() for m in validate_record(RLPromptChat, rec).messages]
    if "prompt" in rec.data:
        return validate_record(RLPromptText, rec).prompt
    found = ", ".join(sorted(map(str, rec.data.keys()))) or "none"
    raise UserError(f"{rec.where}: an RL prompt record needs 'prompt' or 'messages' (found: {found}); "
                    "use data.column_map to rename columns")


class PromptResponse(RecordModel):
    """A response to score (``alignloop score``)."""

    prompt: Prompt
    response: str
