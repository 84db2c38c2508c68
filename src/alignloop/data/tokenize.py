"""Turning SFT records into token ids and loss labels, with truncation, packing and collation.

Loss is only on what the model should learn to write: the completion, or the assistant turns of
a conversation. Every other position carries the label -100.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from jinja2 import TemplateError

from alignloop.data.batching import right_pad
from alignloop.data.formats import Conversation, PlainText, PromptCompletion, SFTExample

IGNORE = -100

# Used only when a tokenizer ships without a chat template. Each turn ends with the EOS token so
# that a model fine-tuned on it learns where an answer stops.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer, override: str | None = None) -> None:
    if override:
        tokenizer.chat_template = override
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """Text the model is conditioned on at generation time: raw prompt, or chat messages through the
    template with the assistant header appended."""
    if isinstance(prompt, str):
        return prompt
    return _render(tokenizer, prompt, add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: str | list[dict], max_len: int) -> list[int]:
    """The ids a policy is conditioned on (PPO's rollouts, eval, DPO): the rendered prompt, with the
    tokenizer's special tokens for a raw text prompt (a chat template writes its own), keeping the last
    ``max_len`` because the response follows the end."""
    ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=isinstance(prompt, str))["input_ids"]
    return ids[-max_len:]


# The assistant's answer in the conversation rendered to find the template's end-of-turn token.
_PROBE_ANSWER = "alignloop probe answer"


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with (``<|im_end|>`` in ChatML,
    ``<|eot_id|>`` in Llama 3, ``<end_of_turn>`` in Gemma, EOS in many others), or None.

    Found by rendering a short conversation and reading what follows the answer: the first token that
    is not whitespace, if it is one of the tokenizer's special (or added special) tokens. None when there
    is no template, the template refuses the probe, or the turn ends with ordinary text."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    probe = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _PROBE_ANSWER}]
    try:
        text = _render(tokenizer, probe, add_generation_prompt=False)
    except TemplateError:  # e.g. a template that insists on a system turn
        return None
    at = text.rfind(_PROBE_ANSWER)
    if at < 0:
        return None
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for token in tokenizer(text[at + len(_PROBE_ANSWER):], add_special_tokens=False)["input_ids"]:
        if token in special:
            return token
        if tokenizer.decode([token]).strip():
            return None
    return None


def stop_token_ids(tokenizer, *configs) -> list[int]:
    """Every token id that ends a response of this model: the EOS of the tokenizer and of each config
    given (the model's config and generation_config; either may hold a list), and the chat template's
    end-of-turn token. A model folder served as it is stops where an exported one does."""
    ids: set[int] = set()
    for source in (tokenizer, *configs):
        eos = getattr(source, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    turn = end_of_turn_id(tokenizer)
    if turn is not None:
        ids.add(turn)
    return sorted(ids)


def _conversation_ids(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and labels that keep only the assistant turns.

    Assistant spans are found as character ranges in the rendered text (each turn runs from the
    start of its content to the end of the text rendered up to and including that turn, which
    covers the template's end-of-turn marker), then mapped onto tokens through offsets.
    """
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        start_search = len(before) if full.startswith(before) else cursor
        start = full.find(msg["content"], start_search) if msg["content"] else start_search
        if start < 0:
            start = start_search
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        end = len(upto) if full.startswith(upto) and len(upto) > start else start + len(msg["content"])
        spans.append((start, end))
        cursor = end
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(s <= a < e for s, e in spans):
            labels[t] = ids[t]
    return ids, labels


def _truncate(ids: list[int], labels: list[int], max_len: int, min_completion: int, stats: Counter):
    if len(ids) <= max_len:
        return ids, labels
    stats["examples_truncated"] += 1
    first = next((i for i, lab in enumerate(labels) if lab != IGNORE), len(ids))
    completion_len = len(ids) - first
    must_keep = min(completion_len, min_completion, max_len)
    if max_len - first >= must_keep:
        # The prompt fits with enough completion: cut the completion's tail.
        stats["completion_tokens_cut"] += len(ids) - max_len
        stats["completions_shortened"] += 1
        return ids[:max_len], labels[:max_len]
    # Otherwise shorten the prompt from the left so the completion keeps `must_keep` tokens.
    prompt_keep = max_len - must_keep
    stats["prompts_shortened"] += 1
    stats["prompt_tokens_cut"] += first - prompt_keep
    cut_completion = completion_len - must_keep
    if cut_completion:
        stats["completions_shortened"] += 1
        stats["completion_tokens_cut"] += cut_completion
    keep = list(range(first - prompt_keep, first)) + list(range(first, first + must_keep))
    return [ids[i] for i in keep], [labels[i] for i in keep]


def tokenize_sft(
    example: SFTExample,
    tokenizer,
    max_len: int,
    min_completion_tokens: int,
    stats: Counter,
) -> TokenizedExample:
    eos = tokenizer.eos_token_id
    if isinstance(example, PromptCompletion):
        prompt_ids = tokenizer(example.prompt, add_special_tokens=True)["input_ids"]
        completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [eos]
        ids = prompt_ids + completion_ids
        labels = [IGNORE] * len(prompt_ids) + completion_ids
    elif isinstance(example, Conversation):
        ids, labels = _conversation_ids(tokenizer, [m.model_dump() for m in example.messages])
    elif isinstance(example, PlainText):
        ids = tokenizer(example.text, add_special_tokens=True)["input_ids"] + [eos]
        labels = list(ids)
    else:  # pragma: no cover - parse_sft returns one of the three
        raise TypeError(type(example))
    ids, labels = _truncate(ids, labels, max_len, min_completion_tokens, stats)
    # The first token is never predicted (nothing precedes it); in a packed row this keeps the
    # previous example's last token from being trained to predict it.
    labels = [IGNORE] + labels[1:]
    if all(lab == IGNORE for lab in labels):
        stats["examples_without_loss_tokens"] += 1
    return TokenizedExample(ids, labels)


def pack_examples(examples: list[TokenizedExample], row_len: int) -> list[list[TokenizedExample]]:
    """Best-fit-decreasing bin packing of examples into rows of at most ``row_len`` tokens."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(examples[i])
        best = -1
        for r, room in enumerate(free):
            if room >= n and (best < 0 or room < free[best]):
                best = r
        if best < 0:
            rows.append([i])
            free.append(row_len - n)
        else:
            rows[best].append(i)
            free[best] -= n
    # Keep the original relative order inside a row so packing is reproducible and readable.
    return [[examples[i] for i in sorted(row)] for row in rows]


def collate_padded(examples: list[TokenizedExample], pad_id: int, pad_to_multiple_of: int = 1) -> dict:
    """Right-padded batch with an attention mask. On GPUs a width rounded up to a multiple keeps the
    number of distinct shapes small (attention kernels are planned per shape)."""
    ids, mask = right_pad([e.input_ids for e in examples], pad_id, pad_to_multiple_of)
    labels, _ = right_pad([e.labels for e in examples], IGNORE, pad_to_multiple_of)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "loss_units": int((labels != IGNORE).sum()), "tokens": int(mask.sum())}


def collate_packed(rows: list[list[TokenizedExample]], pad_id: int) -> dict:
    """Rows of several examples each. No attention mask: position ids restart at every example, which
    transformers turns into a block-diagonal causal mask, so examples never attend to each other.
    Row padding forms its own isolated segment with no loss."""
    width = max(sum(len(e) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    tokens = 0
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e)
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            labels[r, at : at + n] = torch.tensor(e.labels)
            pos[r, at : at + n] = torch.arange(n)
            at += n
        tokens += at
        pos[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "position_ids": pos, "labels": labels,
            "loss_units": int((labels != IGNORE).sum()), "tokens": tokens}
