"""The OpenAI API's shapes as this server speaks them: request bodies and response models.

Every key of a request body is either honoured or refused with a 400 naming it, never dropped: a key
the bodies do not declare is refused unless its value is null (clients send ``"audio": null`` and the
like for "not given"); a declared field whose value the server cannot honour (a penalty, ``suffix``,
``tools``...) is refused by the route's checks (``sampling.py``). Every JSON route declares its response model, so
the OpenAPI schema (``app.openapi()``) describes what clients really receive; streamed routes send
the ``*Chunk`` models as server-sent events.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

# ---------------------------------------------------------------- request bodies


def is_unicode_text(value: Any) -> bool:
    """False when a string in ``value`` (nested lists and dicts too) holds half of a UTF-16 surrogate pair:
    JSON may escape one alone (``"\\ud800"``), but it is no text a tokenizer can take."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, list):
        return all(map(is_unicode_text, value))
    if isinstance(value, dict):
        return all(is_unicode_text(k) and is_unicode_text(v) for k, v in value.items())
    return True


class Body(BaseModel):
    """Undeclared keys are refused (``extra_forbidden``), except those whose value is null (not given)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def drop_unknown_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None or key in cls.model_fields}
        return data

    @field_validator("*")
    @classmethod
    def unicode_text(cls, value: Any) -> Any:
        if not is_unicode_text(value):
            raise ValueError("a string holds a lone UTF-16 surrogate, which is not Unicode text")
        return value


class StreamOptions(Body):
    include_usage: bool = False


class SamplingBody(Body):
    """The sampling fields completions and chat completions share."""

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # an int64, as OpenAI's; choice j uses seed + j
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extension: keep generating past EOS (benchmarks need a fixed number of tokens).
    ignore_eos: bool = False
    # Refused unless 0 / empty: this server has no penalties and no logit bias.
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    # The caller's end-user id, for the caller's own records: nothing to honour here.
    user: str | None = None


class CompletionRequest(SamplingBody):
    # A string, several strings, token ids, or several token-id lists: each prompt has its own n choices.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 (with echo): score the prompt only
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)  # the chosen token's and the k most likely tokens' log-probs
    best_of: int | None = Field(None, ge=1)  # only best_of = n (no server-side ranking)
    suffix: str | None = None  # refused: no insertion


class ChatMessage(Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)  # needs logprobs: true
    response_format: dict[str, Any] | None = None  # only {"type": "text"}
    # Refused unless empty: no tool calling.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class ScoreMessage(Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ScorePair(Body):
    # A plain prompt, or chat messages (the reward model then reads them through its chat template).
    prompt: str | list[ScoreMessage]
    response: str


class ScoreRequest(Body):
    model: str | None = None
    pairs: list[ScorePair] = Field(min_length=1)


# ---------------------------------------------------------------- responses

# How a generation ended: a stop string or EOS, or max_tokens.
FinishReason = Literal["stop", "length"]


class OmitNone(BaseModel):
    """A field left None is left out of the JSON: a streamed chunk carries only what it has (usage
    only in the last one, a delta only its role or its text), as OpenAI's chunks do."""

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions format, one entry per token (the prompt's first, with echo, has no
    log-prob). ``top_logprobs`` maps the k most likely tokens, and the chosen one, to their log-probs;
    ``text_offset`` is where each token's text starts in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int  # prompt index * n + choice of that prompt
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(OmitNone):
    """One server-sent event of a streamed completion; the usage event has no choices."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # the token's text as UTF-8


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]  # the top_logprobs most likely tokens, most likely first


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(OmitNone):
    """The first chunk's delta names the role, the others carry text; the finishing one is empty."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(OmitNone):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ScoreResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    scores: list[float]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every refusal, in OpenAI's shape, so the official clients raise their usual exceptions."""

    error: ErrorDetail


# Declared on every route: any 4xx or 5xx answer is an ErrorResponse. Declaring the 4XX range also
# keeps FastAPI from advertising its own 422 validation answer, which this server never sends.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "the request was refused"},
    "5XX": {"model": ErrorResponse, "description": "the server failed or its engine stopped"},
}


# The same for a route whose success is not JSON (/metrics): FastAPI would file a response model under
# the route's own media type, so the error schema is referenced by hand (its component exists: every
# other route declares ErrorResponse).
ERROR_RESPONSES_OF_TEXT_ROUTE: dict[int | str, dict[str, Any]] = {
    status: {"description": answer["description"],
             "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ErrorResponse.__name__}"}}}}
    for status, answer in ERROR_RESPONSES.items()}


def event_stream(chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI answer of a route that streams with ``stream: true``. Before OpenAPI 3.2's itemSchema, the
    schema of a text/event-stream describes one event (an object of its fields: data, event, id, retry)."""
    event = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
    return {200: {"content": {"text/event-stream": {"schema": event}},
                  "description": f"a JSON object, or with stream=true server-sent events: `data: <{chunk.__name__} "
                                 "JSON>` per piece of text, then `data: [DONE]`"}}
