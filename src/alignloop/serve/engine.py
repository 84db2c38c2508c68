"""Continuous batching for the transformers backend.

One background thread owns the model. It keeps a running batch: every row is a request with its
own slice of one shared KV cache (left-padded to a common length), its own next position and its
own sampling parameters. Each engine step samples one token for every row, streams the new text
to that row's client, drops rows that finished or whose client went away (their slot is free at
once), prefills requests that arrived meanwhile and merges them into the batch, then runs one
forward pass for all rows together. A request therefore never waits for the whole batch ahead of
it to finish; it joins at the next step.

A request with ``n`` choices is ``n`` rows; rows of one request that join together share one prefill
of the prompt (its KV cache is copied to each row). Log-probs come from the very logits each token is
sampled from: log_softmax of the raw logits, before temperature and top-k / top-p. A request that asks
for the prompt's log-probs (echo) is prefilled on its own with the logits of every prompt position,
so they equal a plain forward pass over the prompt.

Caches the merge cannot handle (sliding-window or recurrent layers) fall back to dynamic batching:
new requests form the next batch once the running one is done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from alignloop.data.batching import left_pad, left_pad_tensor, position_ids
from alignloop.data.tokenize import stop_token_ids
from alignloop.generation.sampler import sample_next_token
from alignloop.generation.streaming import (
    Delta,
    EngineStopped,
    Generation,
    QueueFull,
    StreamRequest,
    TokenLogprob,
    context_length_of,
)
from alignloop.models.forward import cached_forward_kwargs
from alignloop.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)


@dataclass
class _Row:
    """Engine-side state of one choice (``index``) of a request, waiting or in the running batch."""

    gen: Generation
    index: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    sent_chars: int = 0
    # Log-probs of the tokens sampled since this row's last Delta (the next Delta carries them).
    pending: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    started: bool = False  # a Delta was pushed (the first one carries the prompt's log-probs)


@dataclass
class _Batch:
    rows: list[_Row]
    cache: object  # transformers DynamicCache
    mask: torch.Tensor  # (B, T): 1 where the cache holds a real token
    positions: torch.Tensor  # (B,): position id of each row's next token
    logits: torch.Tensor  # (B, V): next-token logits, not yet sampled


def sample_tokens(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
    """One token per row, each with its own sampling settings and seeded generator."""
    return [sample_next_token(logits[i], row.gen.params.sampling, row.generator) for i, row in enumerate(rows)]


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """Per row of next-token logits [N, V]: the log-prob of ``tokens[i]`` under log_softmax(logits[i])
    (the raw logits: no temperature) and the ``top`` most likely tokens with theirs, most likely first."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    if top > 0:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        tops = [()] * len(chosen)
    return [TokenLogprob(t, c, k) for t, c, k in zip(tokens, chosen, tops, strict=True)]


class TransformersEngine:
    """Owns the model and the worker thread; ``submit`` is called from the server's event loop."""

    def __init__(self, model, tokenizer, metrics: ServeMetrics, max_batch: int = 32, max_queue: int = 256,
                 context_length: int | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context_length = context_length or context_length_of(model.config)
        self.device = next(model.parameters()).device
        self.stop_ids = set(stop_token_ids(tokenizer, model.config, model.generation_config))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._waiting: deque[_Row] = deque()
        self._running = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ client side (event loop)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._worker, name="alignloop-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, prompt_ids: list[int], params: StreamRequest) -> Generation:
        """Queue the request's ``params.n`` rows together (all or none)."""
        gen = Generation(prompt_ids, params, self._cancelled)
        seed = params.sampling.seed
        rows = [_Row(gen, j, _generator(None if seed is None else seed + j, self.device)) for j in range(params.n)]
        with self._cond:
            if self._stopping or not self.is_alive():
                raise EngineStopped("the generation engine has stopped")
            if len(self._waiting) + self._running + len(rows) > self.max_batch + self.max_queue:
                raise QueueFull(f"server busy: {self._running} running and {len(self._waiting)} queued sequences")
            self._waiting.extend(rows)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify()
        return gen

    def _cancelled(self, gen: Generation) -> None:
        # Queued rows leave the queue now; running ones are dropped at the next engine step.
        with self._cond:
            queued = [row for row in self._waiting if row.gen is gen]
            for row in queued:
                self._waiting.remove(row)
                self.metrics.finished.labels("cancelled").inc()
            self.metrics.queue_depth.set(len(self._waiting))

    # ------------------------------------------------------------------ worker thread

    def _take(self, room: int, block: bool) -> list[_Row]:
        """Up to ``room`` waiting rows that one prefill serves: the rows of one request that wants its
        prompt's log-probs, or rows that want none."""
        with self._cond:
            while block and not self._waiting and not self._stopping:
                self._cond.wait()
            taken: list[_Row] = []
            if self._waiting:
                first = self._waiting[0].gen

                def same_prefill(row: _Row) -> bool:
                    scoring = row.gen.params.prompt_logprobs is not None
                    return row.gen is first if first.params.prompt_logprobs is not None else not scoring

                while self._waiting and len(taken) < room and same_prefill(self._waiting[0]):
                    taken.append(self._waiting.popleft())
            self._running += len(taken)
            self.metrics.queue_depth.set(len(self._waiting))
            self.metrics.running.set(self._running)
            return taken

    def _release(self, n: int) -> None:
        with self._cond:
            self._running -= n
            self.metrics.running.set(self._running)

    def _worker(self) -> None:
        torch.set_grad_enabled(False)
        batch: _Batch | None = None
        while not self._stopping:
            joining: list[_Row] = []
            try:
                # Prefill what waits, one group at a time (see _take), while there is room and the
                # running batch's cache can take new rows.
                while batch is None or _plain_cache(batch.cache):
                    room = self.max_batch - (len(batch.rows) if batch else 0)
                    group = self._take(room, block=batch is None and not joining) if room > 0 else []
                    if not group:
                        break
                    joining += group
                    fresh = self._prefill(group)
                    if fresh is not None:
                        batch = fresh if batch is None else _merge(batch, fresh)
                if batch is not None:
                    batch = self._step(batch)
            except Exception as exc:  # a failing forward ends the requests in it, never the server
                log.exception("engine step failed")
                self._fail((batch.rows if batch else []) + joining, f"generation failed: {exc}")
                batch = None
        self._fail(batch.rows if batch else [], "server shutting down")

    def _fail(self, rows: list[_Row], message: str) -> None:
        """End every request the worker holds with an error; nothing stays counted as running."""
        for gen in {id(r.gen): r.gen for r in rows}.values():
            if not gen.finished and not gen.cancelled:
                gen.push(RuntimeError(message))
        with self._cond:
            self._running = 0
            self.metrics.running.set(0)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache,
                 every_position: bool = False) -> torch.Tensor:
        """Next-token logits [B, V] after the last position, or [B, T, V] after every position."""
        cached = cached_forward_kwargs(self.model, cache, last_position_only=not every_position)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **cached)
        return out.logits.float() if every_position else out.logits[:, -1].float()

    def _prefill(self, rows: list[_Row]) -> _Batch | None:
        """One forward over the distinct prompts of ``rows`` (one group of _take); every row gets a copy
        of its prompt's cache. Rows that only score the prompt finish here; None when no row is left."""
        gens = list({id(r.gen): r.gen for r in rows}.values())
        ids, mask = left_pad([g.prompt_ids for g in gens], self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = position_ids(mask)
        cache = DynamicCache(config=self.model.config)
        k = gens[0].params.prompt_logprobs
        if k is None:
            logits = self._forward(ids, mask, positions, cache)
        else:  # one request (see _take), so no padding: the same numbers as a forward over the prompt alone
            every = self._forward(ids, mask, positions, cache, every_position=True)
            prompt_logprobs = tuple(token_logprobs(every[0, :-1], gens[0].prompt_ids[1:], k))
            logits = every[:, -1]
            for row in rows:
                row.prompt_logprobs = prompt_logprobs
        self.metrics.prompt_tokens.inc(int(mask.sum()))
        live = [r for r in rows if not r.gen.params.prompt_only]
        if len(live) < len(rows):
            for row in rows:
                if row.gen.params.prompt_only:
                    self._push(row, "", "length")
                    self.metrics.finished.labels("length").inc()
            self._release(len(rows) - len(live))
        if not live:
            return None
        source = {id(g): i for i, g in enumerate(gens)}
        return _select(_Batch([], cache, mask, mask.sum(-1), logits), [source[id(r.gen)] for r in live], live)

    def _step(self, batch: _Batch) -> _Batch | None:
        """Sample one token per row, stream it, drop finished rows, then compute the next logits."""
        self.metrics.batch_size.observe(len(batch.rows))
        self.metrics.queue_depth_seen.observe(len(self._waiting))
        tokens = sample_tokens(batch.logits, batch.rows)
        entries = self._logprobs(batch, tokens)
        keep = [i for i, row in enumerate(batch.rows) if self._advance(row, tokens[i], entries[i])]
        self.metrics.generated_tokens.inc(len(tokens))
        if len(keep) < len(batch.rows):
            self._release(len(batch.rows) - len(keep))
            if not keep:
                return None
            batch = _select(batch, keep, [batch.rows[i] for i in keep])
        next_ids = torch.tensor([[tokens[i]] for i in keep], device=self.device)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(keep), 1))], dim=1)
        batch.logits = self._forward(next_ids, batch.mask, batch.positions[:, None], batch.cache)
        batch.positions = batch.positions + 1
        return batch

    def _logprobs(self, batch: _Batch, tokens: list[int]) -> list[TokenLogprob | None]:
        """The log-prob entry of each row's sampled token, for the rows that asked for log-probs."""
        entries: list[TokenLogprob | None] = [None] * len(tokens)
        wanted = [i for i, row in enumerate(batch.rows) if row.gen.params.logprobs is not None]
        if wanted:
            top = max(batch.rows[i].gen.params.logprobs for i in wanted)
            for i, entry in zip(wanted, token_logprobs(batch.logits[wanted], [tokens[i] for i in wanted], top),
                                strict=True):
                entries[i] = replace(entry, top=entry.top[:batch.rows[i].gen.params.logprobs])
        return entries

    def _push(self, row: _Row, text: str, finish: str | None = None) -> None:
        """Stream a piece of a row's text with the log-probs gathered since its last piece."""
        first = not row.started
        row.started = True
        counts = (len(row.gen.prompt_ids), len(row.tokens)) if finish else (0, 0)
        row.gen.push(Delta(text, finish, *counts, index=row.index, logprobs=tuple(row.pending),
                           prompt_logprobs=row.prompt_logprobs if first else None))
        row.pending = []

    def _advance(self, row: _Row, token: int, entry: TokenLogprob | None) -> bool:
        """Record one sampled token for a row and stream its text; False when the row is done. An EOS
        that ends the row counts as generated and has its log-prob (as in OpenAI's and vLLM's answers:
        scoring clients drop the last token's log-prob), but adds no text."""
        gen, s, stop = row.gen, row.gen.params.sampling, row.gen.params.stop
        if gen.cancelled:
            self.metrics.finished.labels("cancelled").inc()
            return False
        if not row.tokens:
            self.metrics.time_to_first_token.observe(time.perf_counter() - gen.arrived)
        finish = "stop" if token in self.stop_ids and s.stop_on_eos else None
        row.tokens.append(token)
        if entry is not None:
            row.pending.append(entry)
        text = self.tokenizer.decode(row.tokens[:-1] if finish else row.tokens, skip_special_tokens=True)
        end = len(text)
        if stop:
            hit = _find_stop(text, stop, max(0, row.sent_chars - max(map(len, stop))))
            if hit is not None:
                end, finish = hit, "stop"
        if finish is None and len(row.tokens) >= s.max_new_tokens:
            finish = "length"
        if finish is None:
            # Hold back what may still turn into a stop string or is half a multi-byte character.
            end -= max(map(len, stop)) - 1 if stop else 0
            if text.endswith("\ufffd"):
                end = min(end, len(text) - 1)
            if end > row.sent_chars:
                self._push(row, text[row.sent_chars:end])
                row.sent_chars = end
            return True
        self._push(row, text[row.sent_chars:end], finish)
        self.metrics.finished.labels(finish).inc()
        return False


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)  # multinomial needs a generator on the logits' device
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def _plain_cache(cache) -> bool:

    return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))


def _trim(mask: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]]):
    """Cut the leading columns that no row attends to any more (left padding of departed rows)."""
    first = int(mask.any(0).int().argmax())
    if first == 0:
        return mask, kv
    return mask[:, first:], [(k[:, :, first:], v[:, :, first:]) for k, v in kv]


def _kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _select(batch: _Batch, keep: list[int], rows: list[_Row]) -> _Batch:
    """The batch of ``rows``, row i's cache, mask, position and logits taken from the batch's row
    ``keep[i]`` (an index may repeat: n choices of one prompt)."""
    idx = torch.tensor(keep, device=batch.mask.device)
    if _plain_cache(batch.cache):
        mask, kv = _trim(batch.mask[idx], [(k[idx], v[idx]) for k, v in _kv(batch.cache)])
        cache = DynamicCache(ddp_cache_data=kv)
    else:
        batch.cache.batch_select_indices(idx)
        mask, cache = batch.mask[idx], batch.cache
    return _Batch(rows, cache, mask, batch.positions[idx], batch.logits[idx])


def _merge(a: _Batch, b: _Batch) -> _Batch:
    """One batch from two: both caches left-padded to the longer one, rows stacked."""

    length = max(a.mask.shape[1], b.mask.shape[1])
    kv = [(torch.cat([left_pad_tensor(ka, length, 2), left_pad_tensor(kb, length, 2)]),
           torch.cat([left_pad_tensor(va, length, 2), left_pad_tensor(vb, length, 2)]))
          for (ka, va), (kb, vb) in zip(_kv(a.cache), _kv(b.cache), strict=True)]
    mask = torch.cat([left_pad_tensor(a.mask, length, 1), left_pad_tensor(b.mask, length, 1)])
    return _Batch(a.rows + b.rows, DynamicCache(ddp_cache_data=kv), mask,
                  torch.cat([a.positions, b.positions]), torch.cat([a.logits, b.logits]))

