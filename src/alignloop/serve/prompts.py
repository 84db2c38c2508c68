"""A request's prompt as the token ids the engine decodes from: tokenised the way the model was trained
(SFT's prompt/completion records for a completion prompt, its chat template for chat messages)."""

from __future__ import annotations

from typing import Any

from alignloop.data.tokenize import render_prompt
from alignloop.serve.errors import APIError
from alignloop.serve.schemas import ChatMessage


def completion_prompts(tokenizer: Any, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    """Every prompt of a completion request as token ids: a string, each string of a list, a list of
    token ids, or each token-id list of a list."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    vocab = len(tokenizer)
    prompts = []
    for i, p in enumerate(prompt):
        param = "prompt" if len(prompt) == 1 else f"prompt.{i}"
        if not p:
            raise APIError(400, "the prompt is empty", param=param)
        if isinstance(p, str):
            # Same tokenisation as SFT's prompt/completion records, so the model sees what it was trained on.
            prompts.append(tokenizer(p, add_special_tokens=True)["input_ids"])
        elif any(t < 0 or t >= vocab for t in p):
            raise APIError(400, f"token ids must lie in [0, {vocab})", param=param)
        else:
            prompts.append(list(p))
    return prompts


def chat_prompt(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    """The messages through the model's chat template, ending with the assistant's turn opened."""
    turns = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):  # content parts: only text is understood by a text model
            if any(part.get("type") != "text" for part in content):
                raise APIError(400, "only text content parts are supported", param=f"messages.{i}.content")
            content = "".join(str(part.get("text", "")) for part in content)
        turns.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
    try:
        text = render_prompt(tokenizer, turns)
    except Exception as exc:  # the model's own template may refuse a role order
        raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
    # The template already holds any BOS it wants (as in SFT's conversation records).
    return tokenizer(text, add_special_tokens=False)["input_ids"]
