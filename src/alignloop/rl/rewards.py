"""Where the reward comes from: a trained reward model, Python functions, or a remote scorer.

Every source maps (prompts, responses, per-record columns) to one float per response; the
configured sources are summed with their weights. A Python function is named by import path,
``"my_pkg.rules:length_bonus"``, and is called as ``fn(prompts, responses, **columns)`` where
``columns`` holds the prompt records' extra fields (lists aligned with ``prompts``). A prompt is
given as in its record: a string, or a list of chat messages.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from alignloop.errors import UserError

log = logging.getLogger(__name__)

RewardFn = Callable[..., Sequence[float]]


def import_callable(spec: str) -> RewardFn:
    """``"pkg.mod:fn"`` -> the function, with a one-line error naming what is wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"reward function {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"reward function {spec!r}: cannot import {module_name} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"reward function {spec!r}: {module_name} has no function {attr!r}")
    return fn


def reward_model_dir(path: str | Path) -> Path:
    """A reward-model run folder or its model/ folder -> the model folder."""
    p = Path(path).expanduser()
    if (p / "model").is_dir():
        return p / "model"
    if not p.exists():
        raise UserError(f"reward model not found: {p}")
    return p


class RewardModelScorer:
    """The reward model's normalised score of each (prompt, response)."""

    def __init__(self, path: str | Path, batch_size: int = 16, device: torch.device | None = None):
        from alignloop.models.reward import RewardModel

        self.path = reward_model_dir(path)
        self.batch_size = batch_size
        self.model = RewardModel.load(self.path, device)

    def __call__(self, prompts: list, responses: list[str], **_: list) -> list[float]:
        return list(self.model.score(prompts, responses, self.batch_size))


class RemoteReward:
    """POST {"pairs": [{"prompt", "response"}]} to ``<url>/v1/score``, expecting {"scores": [...]}."""

    def __init__(self, url: str, timeout: float = 60.0, headers: dict[str, str] | None = None):
        import httpx

        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1/score") else "/v1/score")
        self.client = httpx.Client(timeout=timeout, headers=headers or {})

    def __call__(self, prompts: list, responses: list[str], **_: list) -> list[float]:
        import httpx

        pairs = [{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)]
        try:
            reply = self.client.post(self.url, json={"pairs": pairs})
            reply.raise_for_status()
            scores = reply.json()["scores"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"remote reward {self.url}: {type(exc).__name__}: {str(exc)[:200]}") from None
        if not isinstance(scores, list) or len(scores) != len(pairs):
            raise UserError(f"remote reward {self.url}: expected {len(pairs)} scores, got {str(scores)[:100]}")
        return [float(s) for s in scores]


class CombinedReward:
    """Weighted sum of named reward sources; also reports each source's mean for logging."""

    def __init__(self, sources: dict[str, RewardFn], weights: dict[str, float] | None = None):
        if not sources:
            raise UserError("no reward configured: set reward.model, reward.functions or reward.remote_url")
        unknown = set(weights or {}) - set(sources)
        if unknown:
            raise UserError(f"reward.weights names unknown sources {sorted(unknown)}; known: {sorted(sources)}")
        self.sources = sources
        self.weights = {name: (weights or {}).get(name, 1.0) for name in sources}

    def __call__(self, prompts: list, responses: list[str], columns: dict[str, list] | None = None,
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        total = torch.zeros(len(prompts))
        means: dict[str, float] = {}
        for name, fn in self.sources.items():
            values = torch.tensor([float(v) for v in fn(prompts, responses, **(columns or {}))])
            if values.shape[0] != len(prompts):
                raise UserError(f"reward source {name!r} returned {values.shape[0]} scores for {len(prompts)} "
                                "responses")
            means[name] = values.mean().item()
            total += self.weights[name] * values
        return total, means


def build_reward(model_path: str | None, functions: Sequence[str], remote_url: str | None,
                 weights: dict[str, float] | None, batch_size: int, remote_timeout: float = 60.0,
                 device: torch.device | None = None) -> CombinedReward:
    sources: dict[str, RewardFn] = {}
    if model_path:
        sources["model"] = RewardModelScorer(model_path, batch_size, device)
    for spec in functions:
        sources[spec] = import_callable(spec)
    if remote_url:
        sources["remote"] = RemoteReward(remote_url, remote_timeout)
    return CombinedReward(sources, weights)
