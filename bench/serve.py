"""alignloop serve throughput on CPU: requests/s and generated tokens/s, batched vs one at a time.

    python bench/serve.py --model tiny --fixtures /tmp/peer-bench/fixtures
    python bench/serve.py --model 25m --fixtures /tmp/peer-bench/fixtures --requests 32 --new-tokens 64
    python bench/serve.py --model tiny --fixtures /tmp/peer-bench/fixtures --peer-python ../peer-venv/bin/python

Workload (the generate workload of the peer's hf_generate.py, sent as HTTP requests): the first
``--requests`` of synth.rl_prompts(64), all sent at once by ``--requests`` concurrent clients to
/v1/completions, exactly ``--new-tokens`` new tokens each (ignore_eos), sampling at temperature 1 /
top_p 1, fp32, 2 threads. The same server code runs twice on the same loaded model: with dynamic
(continuous) batching (``--max-batch``, default 32) and with a batch of one (requests served one at
a time, in arrival order). Each mode gets one warm-up request first. The server runs under uvicorn
in a thread of this process and the clients share the process, as a co-located client would.
Prints one ``BENCH_JSON`` line with both modes.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import peer  # bench/ itself is on sys.path when a script here runs


def run_mode(model_dir: Path, prompts: list[str], max_batch: int, new_tokens: int, common) -> dict:
    import httpx

    from alignloop.serve.app import create_app
    from alignloop.serve.backends import build_server
    from alignloop.serve.server import Limits, serve_in_thread

    server = build_server(str(model_dir), max_batch=max_batch, max_queue=len(prompts), served_model_name="bench",
                          device="cpu", dtype="float32", limits=Limits(max_tokens=new_tokens))
    hist = server.metrics.batch_size

    async def one(client: httpx.AsyncClient, i: int, prompt: str) -> tuple[int, float]:
        t = time.perf_counter()
        r = await client.post("/v1/completions", json={
            "model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 1.0, "top_p": 1.0,
            "seed": i, "ignore_eos": True})
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"], time.perf_counter() - t

    async def load(url: str) -> tuple[list[tuple[int, float]], float, tuple, tuple]:
        limits = httpx.Limits(max_connections=len(prompts) + 1, max_keepalive_connections=len(prompts) + 1)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            await one(client, 0, prompts[0])  # warm-up
            count0, sum0 = _hist_totals(hist)
            snap0 = common.cpu_snapshot()
            t0 = time.perf_counter()
            results = await asyncio.gather(*[one(client, i, p) for i, p in enumerate(prompts)])
            wall = time.perf_counter() - t0
            snap1 = common.cpu_snapshot()
            count1, sum1 = _hist_totals(hist)
        return results, wall, (snap0, snap1), (count1 - count0, sum1 - sum0)

    with serve_in_thread(create_app(server)) as url:
        results, wall, snaps, (steps, rows) = asyncio.run(load(url))
    tokens = sum(n for n, _ in results)
    assert tokens == len(prompts) * new_tokens, "every request must generate exactly --new-tokens tokens"
    latencies = sorted(t for _, t in results)
    return {
        "max_batch": max_batch,
        "seconds": round(wall, 3),
        "requests_per_sec": round(len(prompts) / wall, 3),
        "tokens_per_sec": round(tokens / wall, 1),
        "mean_batch_size": round(rows / steps, 2) if steps else None,
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_max_s": round(latencies[-1], 3),
        "other_procs_cores": round(common.other_load(*snaps), 3),
        "params": sum(p.numel() for p in server.engine.model.parameters()),
    }


def _hist_totals(hist) -> tuple[float, float]:
    """(observations, sum) of a prometheus Histogram without labels."""
    values = {s.name: s.value for metric in hist.collect() for s in metric.samples}
    return values["alignloop_batch_size_count"], values["alignloop_batch_size_sum"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["tiny", "25m"], default="tiny")
    ap.add_argument("--fixtures", required=True, help="fixtures/ folder written by the peer's make_fixtures.py")
    ap.add_argument("--requests", type=int, default=32, help="concurrent requests (all sent at once)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32, help="batch limit of the batched mode")
    peer.add_arguments(ap)
    a = ap.parse_args()

    fixtures = Path(a.fixtures).resolve()
    model_dir = fixtures / {"tiny": "llama-tiny", "25m": "llama-25m"}[a.model]
    if not (model_dir / "config.json").exists():
        sys.exit(f"missing fixture {model_dir}: run make_fixtures.py in the peer-bench folder first")
    sys.path.insert(0, str(peer.peer_folder(fixtures)))
    import common  # noqa: I001  (sets thread and offline environment variables before torch loads)
    import synth

    common.setup_torch()
    common.quiet_logs()
    prompts = [synth.rl_prompts(64)[i % 64]["prompt"] for i in range(a.requests)]
    batched = run_mode(model_dir, prompts, a.max_batch, a.new_tokens, common)
    single = run_mode(model_dir, prompts, 1, a.new_tokens, common)
    ours = {
        "bench": "serve",
        "model": a.model,
        "params": batched.pop("params"),
        "requests": a.requests,
        "concurrency": a.requests,
        "new_tokens_per_request": a.new_tokens,
        "decoding": "sample(T=1)",
        "kv_cache": True,
        "batched": batched,
        "one_at_a_time": {k: v for k, v in single.items() if k != "params"},
        "speedup_tokens_per_sec": round(batched["tokens_per_sec"] / single["tokens_per_sec"], 2),
    }
    # The peer: plain model.generate on the same prompts as one batch, no server in between.
    theirs = peer.measure(a, fixtures, "hf_generate.py", ["--model", a.model, "--batch-sizes", str(a.requests),
                                                          "--new-tokens", str(a.new_tokens)])
    common.emit(peer.compare(ours, theirs, "batched.tokens_per_sec", common.peak_rss_mb(), "new_tokens_per_sec"))


if __name__ == "__main__":
    main()
