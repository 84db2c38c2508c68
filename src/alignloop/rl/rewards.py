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
import math
import os
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import torch

from alignloop.config import RewardSettings
from alignloop.errors import UserError
from alignloop.models.reward import RewardModel

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

        self.path = reward_model_dir(path)
        self.batch_size = batch_size
        self.model = RewardModel.load(self.path, device)

    def __call__(self, prompts: list, responses: list[str], **_: list) -> list[float]:
        return list(self.model.score(prompts, responses, self.batch_size))


class RemoteReward:
    """POST {"pairs": [{"prompt", "response"}]} to ``<url>/v1/score``, expecting {"scores": [...]}: one finite
    number per pair. With ``api_key`` every request carries ``Authorization: Bearer <key>``. TLS certificates
    are verified (against ``ca_bundle`` when given, else the system's store). Connection errors, timeouts and
    5xx answers are retried ``retries`` times, waiting 0.5 s, 1 s, 2 s, ... in between; any other failure, or
    an answer with the wrong number of scores or a non-finite one, stops with a one-line UserError."""

    def __init__(self, url: str, timeout: float = 60.0, api_key: str | None = None, ca_bundle: str | None = None,
                 retries: int = 3, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1/score") else "/v1/score")
        verify: ssl.SSLContext | bool = True
        if ca_bundle is not None:
            if not Path(ca_bundle).is_file():
                raise UserError(f"reward.remote_ca_bundle: {ca_bundle} is not a file")
            verify = ssl.create_default_context(cafile=ca_bundle)
        host = httpx.URL(self.url).host
        if api_key and httpx.URL(self.url).scheme == "http" and host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("remote reward %s: the API key is sent unencrypted (http://); use https://", self.url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers, verify=verify, transport=transport)
        self.retries, self.sleep = retries, sleep

    def post(self, body: dict) -> httpx.Response:
        """The scorer's 2xx answer, after retrying connection errors and 5xx answers."""
        for attempt in range(self.retries + 1):
            try:
                reply = self.client.post(self.url, json=body)
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise UserError(f"remote reward {self.url}: {type(exc).__name__}: {str(exc)[:200]} "
                                    f"(after {attempt + 1} tries)") from None
            else:
                if reply.status_code < 500 or attempt == self.retries:
                    break
            self.sleep(0.5 * 2**attempt)
        if reply.status_code in (401, 403):
            raise UserError(f"remote reward {self.url}: HTTP {reply.status_code}: the scorer refused the API key "
                            "(reward.remote_api_key_env names the variable holding it)")
        if not reply.is_success:
            raise UserError(f"remote reward {self.url}: HTTP {reply.status_code}: {reply.text[:200]}")
        return reply

    def __call__(self, prompts: list, responses: list[str], **_: list) -> list[float]:
        pairs = [{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)]
        reply = self.post({"pairs": pairs})
        try:
            scores = reply.json()["scores"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"remote reward {self.url}: the answer is not {{\"scores\": [...]}}: "
                            f"{reply.text[:100]!r}") from None
        if not isinstance(scores, list) or len(scores) != len(pairs):
            raise UserError(f"remote reward {self.url}: expected {len(pairs)} scores, got {str(scores)[:100]}")
        for i, s in enumerate(scores):
            if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s):
                raise UserError(f"remote reward {self.url}: score {i} is {s!r}, not a finite number")
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


def remote_api_key(env_name: str | None) -> str | None:
    """The remote scorer's API key, read from the environment variable the config names (never the config)."""
    if env_name is None:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise UserError(f"reward.remote_api_key_env: environment variable {env_name} is not set")
    return key


def build_reward(settings: RewardSettings, device: torch.device | None = None) -> CombinedReward:
    sources: dict[str, RewardFn] = {}
    if settings.model:
        sources["model"] = RewardModelScorer(settings.model, settings.batch_size, device)
    for spec in settings.functions:
        sources[spec] = import_callable(spec)
    if settings.remote_url:
        sources["remote"] = RemoteReward(settings.remote_url, settings.remote_timeout,
                                         remote_api_key(settings.remote_api_key_env), settings.remote_ca_bundle,
                                         settings.remote_retries)
    return CombinedReward(sources, settings.weights)
