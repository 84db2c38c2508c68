"""The engine's log-probs (token ids and numbers) in the OpenAI API's two formats: the legacy
completions one (``tokens``, ``token_logprobs``, ``top_logprobs`` as dicts, ``text_offset``) and chat's
(``content: [{token, logprob, bytes, top_logprobs}]``).

A token's text is what it adds to the text before it (decoding a token alone drops a leading space
with some tokenizers), so one choice is formatted by one :class:`ChoiceLogprobs` that follows its
tokens, across streamed chunks too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from alignloop.generation.streaming import TokenLogprob
from alignloop.serve.schemas import ChatTokenLogprob, CompletionLogprobs, TopLogprob

# Tokens before a token that are decoded with it to find its text (enough for a multi-byte character).
CONTEXT_TOKENS = 4
# JSON has no -inf; OpenAI and vLLM report a log-prob that low as -9999.
LOWEST_LOGPROB = -9999.0

# A token id with its log-prob entry; the prompt's first token has none.
Item = tuple[int, TokenLogprob | None]


def prompt_items(prompt_ids: Sequence[int], prompt_logprobs: Sequence[TokenLogprob]) -> list[Item]:
    """The prompt's tokens with their log-probs (``prompt_logprobs`` covers positions 1..)."""
    return [(prompt_ids[0], None)] + [(entry.token_id, entry) for entry in prompt_logprobs]


def generated_items(entries: Sequence[TokenLogprob]) -> list[Item]:
    return [(entry.token_id, entry) for entry in entries]


def finite(logprob: float) -> float:
    return max(logprob, LOWEST_LOGPROB)


class TokenTexts:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def pieces(self, context: Sequence[int], tokens: Sequence[int]) -> list[str]:
        """The text each of ``tokens`` adds when it follows ``context`` (alternatives at one position)."""
        window = list(context[-CONTEXT_TOKENS:])
        before = self.decode(window)
        pieces = []
        for token in tokens:
            after = self.decode(window + [token])
            pieces.append(after[len(before):] if after.startswith(before) else self.decode([token]))
        return pieces


class ChoiceLogprobs:
    """Formats one choice's tokens in order; ``context`` holds the token ids before the first one (the
    prompt, unless the prompt itself is formatted first: echo)."""

    def __init__(self, texts: TokenTexts, context: Sequence[int] = ()) -> None:
        self.texts = texts
        self.context = list(context)
        self.offset = 0  # where the next token's text starts in the choice's text

    def _step(self, token: int, entry: TokenLogprob | None) -> tuple[str, list[tuple[str, float]]]:
        """The token's text and its top alternatives' (text, log-prob); the context moves past it."""
        alternatives = [t for t, _ in entry.top] if entry is not None else []
        piece, *others = self.texts.pieces(self.context, [token, *alternatives])
        self.context.append(token)
        self.offset += 0 if token in self.texts.special else len(piece)  # the text skips special tokens
        return piece, list(zip(others, [finite(lp) for _, lp in entry.top] if entry else [], strict=True))

    def legacy(self, items: Sequence[Item]) -> CompletionLogprobs:
        """Completions' format: ``top_logprobs`` holds the k most likely tokens and always the chosen one."""
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for token, entry in items:
            out.text_offset.append(self.offset)
            piece, top = self._step(token, entry)
            out.tokens.append(piece)
            if entry is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(finite(entry.logprob))
            ranked = dict(top)
            ranked.setdefault(piece, finite(entry.logprob))
            out.top_logprobs.append(ranked)
        return out

    def chat(self, entries: Sequence[TokenLogprob]) -> list[ChatTokenLogprob]:
        """Chat's format: ``top_logprobs`` holds exactly the k most likely tokens, most likely first."""
        out = []
        for entry in entries:
            piece, top = self._step(entry.token_id, entry)
            out.append(ChatTokenLogprob(token=piece, logprob=finite(entry.logprob), bytes=list(piece.encode()),
                                        top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode()))
                                                      for t, lp in top]))
        return out
