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
