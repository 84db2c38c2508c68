"""The vLLM engine: serve's ``--engine vllm`` (paged attention, continuous batching) for now; the RL
side (a vLLM Sampler with weight sync) comes next.

Used only when asked for; it needs the vllm package and a CUDA GPU, and this module imports without
vllm installed. vLLM schedules and batches on its own, so this adapter only maps a request's
SamplingConfig to vLLM's sampling parameters, turns vLLM's cumulative outputs into text deltas, and
aborts a request whose client went away.
"""

from __future__ import annotations

import asyncio
import importlib.util

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
    context_length_of,
)
from alignloop.models.load import load_tokenizer, model_source


def check_vllm_available() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise UserError("--engine vllm needs the vllm package (pip install vllm) and a CUDA GPU; "
                        "use --engine transformers (the default) otherwise")
    if not torch.cuda.is_available():
        raise UserError("--engine vllm needs a CUDA GPU and none is visible; use --engine transformers")


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

        s = gen.params.sampling
        # vLLM's "top-k off" is -1; temperature 0 is greedy in both. Besides the tokenizer's EOS, a response
        # ends at the chat template's end-of-turn token and every EOS the configs name (stop_token_ids).
        sampling = VSampling(max_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                             top_k=s.top_k or -1, stop=list(gen.params.stop), seed=s.seed,
                             ignore_eos=not s.stop_on_eos,
                             stop_token_ids=self.stop_ids if s.stop_on_eos else None)
        sent = 0
        self.metrics.prompt_tokens.inc(len(gen.prompt_ids))
        try:
            async for out in self.llm.generate({"prompt_token_ids": gen.prompt_ids}, sampling, str(gen.id)):
                if gen.cancelled:
                    return
                choice = out.outputs[0]
                finish = choice.finish_reason if out.finished else None
                if choice.text[sent:] or finish:
                    n = len(choice.token_ids)
                    gen.push(Delta(choice.text[sent:], finish, len(gen.prompt_ids) if finish else 0,
                                   n if finish else 0))
                    sent = len(choice.text)
                if finish:
                    self.metrics.generated_tokens.inc(len(choice.token_ids))
                    self.metrics.finished.labels(finish).inc()
        except Exception as exc:  # surfaces in the client's stream, the server stays up
            gen.push(RuntimeError(f"generation failed: {exc}"))
        finally:
            self._in_flight -= 1
