"""Rollout generation throughput on CPU: alignloop's sampler against plain model.generate, same run.

    python bench/generate.py --model tiny --fixtures /tmp/peer-bench/fixtures
    python bench/generate.py --model 25m --fixtures /tmp/peer-bench/fixtures --batch-size 32 --new-tokens 64
    python bench/generate.py --model 25m --fixtures /tmp/peer-bench/fixtures --precision bf16 [--hf-precision fp32]
    .venv-vllm/bin/python bench/generate.py --model tiny --fixtures /tmp/peer-bench/fixtures --backend vllm

Workload (the peer's hf_generate.py): the first ``--batch-size`` of synth.rl_prompts(64), left-padded,
exactly ``--new-tokens`` new tokens per sequence (ours: stop_on_eos false; model.generate:
min_new_tokens = max_new_tokens), sampling at temperature 1 / top_k 0 / top_p 1, KV cache on, 2 threads,
in ``--precision`` (ours: generation.precision, a bf16 weight copy; model.generate: the model cast to it)
unless ``--hf-precision`` gives model.generate another one (ours in bf16 against the fp32 baseline).
``--backend vllm`` times alignloop's vLLM sampler (generation.backend=vllm, an in-process engine loaded
with the same weights; `make vllm-env`) in place of its transformers one, against the same model.generate.
Both run on the same loaded model, alternating call by call (so a change in the machine's load hits both alike): one warm-up call each, then ``--repeats`` timed calls each; new tokens/s from the
median call time. Prints one ``BENCH_JSON`` line with both figures, their ratio and the process's peak RSS
(common.emit adds it).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import peer  # bench/ itself is on sys.path when a script here runs

PEER = Path(os.environ.get("ALIGNLOOP_PEER_BENCH", Path(__file__).resolve().parents[2] / "shared" / "peer-bench"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["tiny", "25m"], default="tiny")
    ap.add_argument("--fixtures", required=True, help="fixtures/ folder written by the peer's make_fixtures.py")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                    help="ours (generation.precision; auto: what collect / eval / predict get on this machine)")
    ap.add_argument("--hf-precision", choices=["fp32", "bf16"], default=None,
                    help="model.generate's precision (default: --precision; fp32 for auto)")
    ap.add_argument("--backend", choices=["transformers", "vllm"], default="transformers",
                    help="alignloop's sampler (generation.backend)")
    a = ap.parse_args()

    fixtures = Path(a.fixtures).resolve()
    model_dir = fixtures / {"tiny": "llama-tiny", "25m": "llama-25m"}[a.model]
    if not (model_dir / "config.json").exists():
        sys.exit(f"missing fixture {model_dir}: run make_fixtures.py in the peer-bench folder first")
    # the peer folder that wrote the fixtures (a working copy), else the shared one
    sys.path.insert(0, str(fixtures.parent if (fixtures.parent / "synth.py").exists() else PEER))
    import common  # noqa: I001  (sets thread and offline environment variables before torch loads)
    import synth

    torch = common.setup_torch()
    common.quiet_logs()
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from alignloop.config import SamplingConfig
    from alignloop.generation.backends import PRECISION_DTYPES, make_sampler

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    texts = [p["prompt"] for p in synth.rl_prompts(64)]
    texts = [texts[i % len(texts)] for i in range(a.batch_size)]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    prompts = tokenizer(texts)["input_ids"]  # the same tokens, unpadded: the sampler pads them itself
    hf_config = GenerationConfig(
        max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, use_cache=True, do_sample=True, temperature=1.0,
        top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id)
    sampling = SamplingConfig(max_new_tokens=a.new_tokens, temperature=1.0, stop_on_eos=False, precision=a.precision,
                              backend=a.backend)
    sampler = make_sampler(model, [tokenizer.eos_token_id], tokenizer.pad_token_id, sampling)
    hf_precision = a.hf_precision or ("fp32" if a.precision == "auto" else a.precision)
    hf_model = model if hf_precision == "fp32" else copy.deepcopy(model).to(PRECISION_DTYPES[hf_precision])

    def ours() -> int:
        return sampler.generate(prompts, sampling).response_ids.shape[1]

    def hf() -> int:
        return hf_model.generate(**batch, generation_config=hf_config).shape[1] - batch["input_ids"].shape[1]

    times: dict[str, list[float]] = {"alignloop": [], "model_generate": []}
    snap0 = None
    with torch.inference_mode():
        for r in range(a.repeats + 1):
            if r == 1:
                snap0 = common.cpu_snapshot()
            for name, run in (("alignloop", ours), ("model_generate", hf)):
                torch.manual_seed(r)
                t = time.perf_counter()
                new = run()
                dt = time.perf_counter() - t
                assert new == a.new_tokens, f"{name} generated {new} tokens, not {a.new_tokens}"
                if r > 0:  # r == 0 is the warm-up
                    times[name].append(dt)
    snap1 = common.cpu_snapshot()
    new_tokens = a.batch_size * a.new_tokens
    figures = {name: {"call_seconds_median": round(statistics.median(t), 4),
                      "new_tokens_per_sec": round(new_tokens / statistics.median(t), 1)}
               for name, t in times.items()}
    common.emit({
        "bench": "generate",
        "model": a.model,
        "params": common.param_count(model),
        "batch_size": a.batch_size,
        "prompt_len_padded": int(batch["input_ids"].shape[1]),
        "new_tokens_per_seq": a.new_tokens,
        "decoding": "sample(T=1)",
        "backend": a.backend,
        "precision": a.precision,
        "sampler_dtype": str(getattr(sampler, "dtype", None) or next(model.parameters()).dtype).removeprefix("torch."),
        "model_generate_precision": hf_precision,
        "kv_cache": True,
        "repeats": a.repeats,
        **figures,
        "speedup": round(figures["alignloop"]["new_tokens_per_sec"] / figures["model_generate"]["new_tokens_per_sec"],
                         2),
        "other_procs_cores": round(common.other_load(snap0, snap1), 3),
        "host": peer.host(),
    })


if __name__ == "__main__":
    main()
