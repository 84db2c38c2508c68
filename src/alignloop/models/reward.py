"""Reward models: how a (prompt, response) pair becomes text, loading a trained one, and scoring.

A reward model is a transformers ``AutoModelForSequenceClassification`` whose ``num_labels`` heads
(one, or one per criterion) are read at the last non-padding token (decoders) or the pooled output
(encoders): exactly what transformers' sequence-classification models do. Its ``alignloop.json``
holds the criteria, their weights and the normalisation statistics that ``score`` applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification

from alignloop.config import ModelConfig
from alignloop.data.batching import length_batches, right_pad
from alignloop.data.formats import chat_as_lines
from alignloop.data.tokenize import DEFAULT_CHAT_TEMPLATE
from alignloop.errors import UserError
from alignloop.models.forward import body_and_score_head, scored_hidden_states
from alignloop.models.load import load_pretrained, read_meta

PromptLike = str | list[dict]


def join_plain(prompt: str, response: str) -> str:
    """Prompt and response as one text, with one space at the seam unless the prompt ends in whitespace.

    Collected candidates are stored stripped while PPO scores the decoded tokens as generated (usually
    with a leading space): both must reach the reward model as the same text, or it is scored on
    token sequences it never saw in training."""
    response = response.lstrip()
    return prompt + response if not prompt or prompt[-1].isspace() else f"{prompt} {response}"


def _chat_as_plain_text(tokenizer) -> bool:
    """An encoder's tokenizer (BERT, MiniLM) has no chat template of its own and no EOS token for the
    default template to end turns with: a chat prompt reaches it as plain "role: content" lines, with its
    own [CLS] / [SEP]."""
    return tokenizer.eos_token is None and tokenizer.chat_template in (None, DEFAULT_CHAT_TEMPLATE)


def format_for_reward(tokenizer, prompt: PromptLike, response: str) -> str:
    """The text a reward model reads: chat prompts go through the chat template with the response as
    the assistant turn; a plain prompt is ``join_plain(prompt, response)`` followed by the EOS token (so a
    decoder reads the reward at a token that marks the answer as finished)."""
    if isinstance(prompt, str):
        return join_plain(prompt, response) + (tokenizer.eos_token or "")
    messages = [m if isinstance(m, dict) else m.model_dump() for m in prompt]
    if _chat_as_plain_text(tokenizer):
        return join_plain(chat_as_lines(messages) + "\nassistant:", response)
    messages = messages + [{"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         chat_template=tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE)


def encode_for_reward(tokenizer, prompt: PromptLike, response: str, max_len: int) -> tuple[list[int], bool]:
    """Token ids of format_for_reward's text and whether they were truncated.

    Too-long texts keep their first token (BOS / [CLS], which encoders pool) and their last
    ``max_len - 1`` tokens: the end of the response is where a decoder reads the reward.
    """
    text = format_for_reward(tokenizer, prompt, response)
    # A chat template writes its own special tokens; plain text gets the tokenizer's (BOS, [CLS]/[SEP]).
    ids = tokenizer(text, add_special_tokens=isinstance(prompt, str) or _chat_as_plain_text(tokenizer))["input_ids"]
    if len(ids) <= max_len:
        return ids, False
    return ids[:1] + ids[len(ids) - max_len + 1 :], True


def combine_criteria(scores: torch.Tensor, weights: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """A reward model's reward from its criteria heads' outputs ``scores`` [..., H]: their sum weighted by
    ``weights`` [H], normalised with the training set's ``mean`` and ``std`` (0 and 1: the raw weighted
    sum). Linear in ``scores``, so it also maps a score head's weight matrix (transposed) onto one head."""
    return (scores @ weights.to(scores) - mean) / std


def model_max_len(model, wanted: int) -> int:
    """``wanted`` capped by the model's position embeddings (encoders such as BERT stop at 512)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(wanted, limit) if limit else wanted


@torch.no_grad()
def head_scores(model, seqs: Sequence[list[int]], pad_id: int, batch_size: int,
                device: torch.device | None = None) -> torch.Tensor:
    """Raw head outputs [len(seqs), num_labels], batching sequences of similar length together."""
    device = device or next(model.parameters()).device
    out = torch.empty(len(seqs), model.config.num_labels, dtype=torch.float32)
    batches = length_batches([len(s) for s in seqs], batch_size)
    parts = body_and_score_head(model)
    for idx in tqdm(batches, desc="score", leave=False, disable=len(batches) < 20):
        # Right padding: the pad id never occurs inside a sequence (load_pretrained keeps it distinct from
        # EOS), so the model finds each sequence's last real token.
        ids, mask = right_pad([seqs[i] for i in idx], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        if parts is None:
            out[idx] = model(input_ids=ids, attention_mask=mask).logits.float().cpu()
            continue
        # a decoder's score head reads each sequence's last token: the last layer computes only there
        rows = torch.arange(len(idx), device=device)
        hidden = scored_hidden_states(parts[0], rows, mask.sum(1) - 1, input_ids=ids, attention_mask=mask)
        out[idx] = parts[1](hidden).float().cpu()
    return out


class RewardModel:
    """A trained reward model ready to score: ``RewardModel.load("runs/rm/model").score(prompts, responses)``."""

    def __init__(self, model, tokenizer, meta: dict, max_len: int = 1024):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.meta = meta
        self.criteria: list[str] = meta.get("criteria") or ["reward"]
        self.weights = torch.tensor(meta.get("criteria_weights") or [1.0] * len(self.criteria))
        norm = meta.get("normalization") or {}
        self.mean = float(norm.get("mean", 0.0))
        self.std = float(norm.get("std", 1.0)) or 1.0
        self.max_len = model_max_len(model, int(meta.get("max_seq_len", max_len)))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> RewardModel:
        folder = Path(path)
        meta = read_meta(folder)
        if meta.get("stage") != "rm":
            raise UserError(f"{folder} is not a reward model folder (its alignloop.json has no stage 'rm'); "
                            "pass a reward run's model/ folder")
        dev = torch.device(device) if device is not None else \
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, tok = load_pretrained(ModelConfig(name_or_path=str(folder)),
                                     auto_cls=AutoModelForSequenceClassification, device=dev, for_training=False)
        return cls(model.to(dev), tok, meta)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _encode(self, prompts: Sequence[PromptLike], responses: Sequence[str]) -> list[list[int]]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return [encode_for_reward(self.tokenizer, p, r, self.max_len)[0]
                for p, r in zip(prompts, responses, strict=True)]

    def score_criteria(self, prompts: Sequence[PromptLike], responses: Sequence[str],
                       batch_size: int = 16) -> list[list[float]]:
        """Raw per-criterion head outputs, one list (in ``self.criteria`` order) per response."""
        if not responses:
            return []
        raw = head_scores(self.model, self._encode(prompts, responses), self.tokenizer.pad_token_id, batch_size)
        return raw.tolist()

    def score(self, prompts: Sequence[PromptLike], responses: Sequence[str], batch_size: int = 16) -> list[float]:
        """The reward: criteria heads combined with their weights, normalised with the stored mean/std."""
        if not responses:
            return []
        raw = head_scores(self.model, self._encode(prompts, responses), self.tokenizer.pad_token_id, batch_size)
        return combine_criteria(raw, self.weights, self.mean, self.std).tolist()
