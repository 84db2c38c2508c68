"""Loading a model folder into a ready :class:`~alignloop.serve.server.Server`: a reward model (its
alignloop.json says stage 'rm') becomes a scorer for /v1/score, anything else a generation engine
(transformers' continuous batching, or vLLM when asked for)."""

from __future__ import annotations

from pathlib import Path

import torch

from alignloop.config import ModelConfig
from alignloop.data.tokenize import ensure_chat_template
from alignloop.generation.sampler import inference_device
from alignloop.generation.vllm import VLLMEngine
from alignloop.models.load import load_pretrained, read_meta
from alignloop.models.reward import RewardModel
from alignloop.serve.engine import TransformersEngine
from alignloop.serve.metrics import ServeMetrics
from alignloop.serve.server import Limits, Scorer, Server, StreamingEngine

SCORE_BATCH_SIZE = 32


def build_server(model: str, engine: str = "transformers", api_key: str | None = None, limits: Limits | None = None,
                 max_batch: int = 32, max_queue: int = 256, served_model_name: str | None = None,
                 device: str = "auto", dtype: str = "auto") -> Server:
    """Load ``model`` (a folder, hub id, .gguf file or short name) and wrap it with the serving settings.
    The model id clients pass is ``served_model_name``, else the folder's name."""
    limits = limits or Limits()
    metrics = ServeMetrics()
    name = served_model_name or Path(model.rstrip("/")).name or model
    dev = inference_device() if device == "auto" else torch.device(device)
    if read_meta(model).get("stage") == "rm":
        return Server(name, limits, metrics, scorer=load_scorer(model, dev), api_key=api_key)
    if engine == "vllm":
        gen_engine: StreamingEngine = VLLMEngine.create(model, metrics, max_batch=max_batch, max_queue=max_queue,
                                                        dtype=dtype)
    else:
        gen_engine = load_transformers_engine(model, metrics, max_batch, max_queue, dev, dtype)
    if limits.max_prompt_tokens >= gen_engine.context_length:
        limits.max_prompt_tokens = gen_engine.context_length - 1
    # A request's choices must fit the engine at once (running + queued), else it could never run.
    limits.max_choices = min(limits.max_choices, max_batch + max_queue)
    return Server(name, limits, metrics, engine=gen_engine, api_key=api_key)


def load_scorer(model: str, device: torch.device) -> Scorer:
    reward = RewardModel.load(model, device=device)

    def scorer(prompts: list, responses: list[str]) -> list[float]:
        return reward.score(prompts, responses, batch_size=SCORE_BATCH_SIZE)

    return scorer


def load_transformers_engine(model: str, metrics: ServeMetrics, max_batch: int, max_queue: int,
                             device: torch.device, dtype: str) -> TransformersEngine:
    lm, tok = load_pretrained(ModelConfig(name_or_path=model, dtype=dtype), device=device, for_training=False)
    ensure_chat_template(tok)
    return TransformersEngine(lm.to(device), tok, metrics, max_batch=max_batch, max_queue=max_queue)
