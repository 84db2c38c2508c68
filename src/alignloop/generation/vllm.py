"""The vLLM engine: serve's ``--engine vllm`` (paged attention, continuous batching) for now; the RL
side (a vLLM Sampler with weight sync) comes next.

Used only when asked for; it needs the vllm package and a CUDA GPU, and this module imports without
vllm installed. vLLM schedules and batches on its own, so this adapter only maps a request's
StreamRequest to vLLM's sampling parameters (``vllm_sampling_kwargs``: n, log-probs, prompt log-probs),
turns vLLM's cumulative outputs into text deltas per choice with their log-probs
(``vllm_token_logprobs``), and aborts a request whose client went away. vLLM reports the raw
log-probs (before temperature) by default, as the transformers engine does. With a seed and n > 1,
vLLM draws the n choices from one seeded generator (the transformers engine seeds choice j with
seed + j), so seeded choices are reproducible on each engine but differ between them.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import AutoConfig, GenerationConfig

from alignloop.config import ModelConfig
from alignloop.data.tokenize import ensure_chat_template, stop_token_ids
from alignloop.errors import UserError
from alignloop.generation.streaming import (
    Delta,
    EngineCounters,
    Generation,
    QueueFull,
    StreamRequest,
    TokenLogprob,
    context_length_of,
)
from alignloop.models.load import load_tokenizer, model_source


def check_vllm_available() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise UserError("--engine vllm needs the vllm package (pip install vllm) and a CUDA GPU; "
                        "use --engine transformers (the default) otherwise")
    if not torch.cuda.is_available():
        raise UserError("--engine vllm needs a CUDA GPU and none is visible; use --engine transformers")


def vllm_sampling_kwargs(params: StreamRequest, stop_ids: Sequence[int]) -> dict[str, Any]:
    """vLLM SamplingParams keyword arguments for a request. vLLM generates at least one token, so a
    prompt-only request (echo with max_tokens 0) asks for one and drops it, as vLLM's own server does.
    Besides the tokenizer's EOS, a response ends at every id of ``stop_ids`` (stop_token_ids: the chat
    template's end-of-turn token and every EOS the configs name)."""
    s = params.sampling
    # vLLM's "top-k off" is -1; temperature 0 is greedy in both.
    return dict(n=params.n, max_tokens=1 if params.prompt_only else s.max_new_tokens, temperature=s.temperature,
                top_p=s.top_p, top_k=s.top_k or -1, stop=list(params.stop), seed=s.seed,
                ignore_eos=not s.stop_on_eos, stop_token_ids=list(stop_ids) if s.stop_on_eos else None,
                logprobs=params.logprobs, prompt_logprobs=params.prompt_logprobs)


def vllm_token_logprobs(token_ids: Sequence[int], positions: Sequence[Mapping[int, Any]],
                        top: int) -> list[TokenLogprob]:
    """vLLM's log-probs per position ({token id: Logprob with .logprob and its 1-based .rank}: the chosen
    token and the most likely ones) as TokenLogprobs with the ``top`` most likely, most likely first."""
    entries = []
    for token, position in zip(token_ids, positions, strict=True):
        ranked = sorted(((t, lp) for t, lp in position.items() if lp.rank is not None and lp.rank <= top),
                        key=lambda item: item[1].rank)
        entries.append(TokenLogprob(token, position[token].logprob, tuple((t, lp.logprob) for t, lp in ranked)))
    return entries


class VLLMEngine:
    def __init__(self, llm, tokenizer, metrics: EngineCounters, context_length: int, max_batch: int,
                 max_queue: int, stop_ids: list[int]) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.metrics = metrics
        self.context_length = context_length
        self.capacity = max_batch + max_queue
        self._in_flight = 0

    @classmethod
    def create(cls, model: str, metrics: EngineCounters, max_batch: int = 32, max_queue: int = 256,
               dtype: str = "auto") -> VLLMEngine:
        check_vllm_available()
        from vllm import AsyncEngineArgs, AsyncLLMEngine  # optional dependency: only with --engine vllm

        source = model_source(ModelConfig(name_or_path=model))
        llm = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=source, dtype=dtype, max_num_seqs=max_batch))
        tokenizer = load_tokenizer(source)
        ensure_chat_template(tokenizer)
        config = AutoConfig.from_pretrained(source)
        try:
            saved_generation = GenerationConfig.from_pretrained(source)
        except OSError:  # the folder has no generation_config.json
            saved_generation = None
        stop_ids = stop_token_ids(tokenizer, config, saved_generation)
        return cls(llm, tokenizer, metrics, context_length_of(config), max_batch, max_queue, stop_ids)

    def start(self) -> None:
        """vLLM runs its own scheduler loop."""

    def is_alive(self) -> bool:
        return not getattr(self.llm, "errored", False)

    def stop(self) -> None:
        shutdown = getattr(self.llm, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def submit(self, prompt_ids: list[int], params: StreamRequest) -> Generation:
        if self._in_flight >= self.capacity:
            raise QueueFull(f"server busy: {self._in_flight} requests in flight")
        gen = Generation(prompt_ids, params, self._abort)
        self._in_flight += 1
        asyncio.get_running_loop().create_task(self._run(gen))
        return gen

    def _abort(self, gen: Generation) -> None:
        result = self.llm.abort(str(gen.id))
        if asyncio.iscoroutine(result):
            asyncio.get_running_loop().create_task(result)
        self.metrics.finished.labels("cancelled").inc()

    async def _run(self, gen: Generation) -> None:
        from vllm import SamplingParams as VSampling  # optional dependency: only with --engine vllm

        params = gen.params
        sampling = VSampling(**vllm_sampling_kwargs(params, self.stop_ids))
        prompt_len = len(gen.prompt_ids)
        sent_chars, sent_tokens = [0] * params.n, [0] * params.n
        started, done = [False] * params.n, [False] * params.n
        self.metrics.prompt_tokens.inc(prompt_len)
        try:
            async for out in self.llm.generate({"prompt_token_ids": gen.prompt_ids}, sampling, str(gen.id)):
                if gen.cancelled:
                    return
                prompt_logprobs = None
                if params.prompt_logprobs is not None and out.prompt_logprobs is not None:
                    prompt_logprobs = tuple(vllm_token_logprobs(gen.prompt_ids[1:], out.prompt_logprobs[1:],
                                                                params.prompt_logprobs))
                for choice in out.outputs:
                    j = choice.index
                    if done[j]:
                        continue
                    finish = choice.finish_reason
                    if params.prompt_only:  # the one token vLLM had to generate is dropped
                        if finish:
                            gen.push(Delta("", "length", prompt_len, 0, index=j, prompt_logprobs=prompt_logprobs))
                            done[j] = True
                        continue
                    new_tokens = choice.token_ids[sent_tokens[j]:]
                    entries = () if params.logprobs is None else tuple(vllm_token_logprobs(
                        new_tokens, choice.logprobs[sent_tokens[j]:], params.logprobs))
                    if choice.text[sent_chars[j]:] or entries or finish:
                        counts = (prompt_len, len(choice.token_ids)) if finish else (0, 0)
                        gen.push(Delta(choice.text[sent_chars[j]:], finish, *counts, index=j, logprobs=entries,
                                       prompt_logprobs=None if started[j] else prompt_logprobs))
                        sent_chars[j], sent_tokens[j], started[j] = len(choice.text), len(choice.token_ids), True
                    if finish:
                        done[j] = True
                        self.metrics.generated_tokens.inc(len(choice.token_ids))
                        self.metrics.finished.labels(finish).inc()
        except Exception as exc:  # surfaces in the client's stream, the server stays up
            gen.push(RuntimeError(f"generation failed: {exc}"))
        finally:
            self._in_flight -= 1
