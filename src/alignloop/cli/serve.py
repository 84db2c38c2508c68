"""``alignloop serve``: an OpenAI-compatible HTTP server for a model folder."""

from __future__ import annotations

import argparse
import os

from alignloop.cli.common import examples_epilog
from alignloop.errors import UserError


def run(args: argparse.Namespace) -> int:
    import uvicorn  # the web stack and torch: only once the command runs

    from alignloop.serve.app import create_app
    from alignloop.serve.backends import build_server
    from alignloop.serve.server import Limits

    if args.engine == "vllm":
        from alignloop.generation.vllm import check_vllm_available

        check_vllm_available()  # before loading anything: a clear one-line error
    for flag in ("max_batch", "max_tokens_limit", "max_body_bytes", "max_prompt_tokens", "max_total_prompt_tokens",
                 "max_n", "max_choices"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1 (got {value})")
    for flag in ("max_queue", "max_top_logprobs"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} must be 0 or more (got {getattr(args, flag)})")
    api_key = args.api_key or os.environ.get("ALIGNLOOP_API_KEY") or None
    limits = Limits(max_prompt_tokens=args.max_prompt_tokens or 1 << 30, max_tokens=args.max_tokens_limit,
                    default_max_tokens=min(args.default_max_tokens, args.max_tokens_limit),
                    max_total_prompt_tokens=args.max_total_prompt_tokens, max_n=args.max_n,
                    max_choices=args.max_choices, max_top_logprobs=args.max_top_logprobs,
                    max_body_bytes=args.max_body_bytes)
    server = build_server(args.model, engine=args.engine, api_key=api_key, limits=limits, max_batch=args.max_batch,
                          max_queue=args.max_queue, served_model_name=args.served_model_name, device=args.device,
                          dtype=args.dtype)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without an API key (set --api-key or ALIGNLOOP_API_KEY)")
    kind = "reward model (/v1/score)" if server.engine is None else f"{args.engine} engine"
    print(f"serving '{server.model_name}' ({kind}) on http://{args.host}:{args.port}/v1")
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                timeout_graceful_shutdown=5)
    return 0


def add_command(sub) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-compatible server (completions, chat, streaming, /v1/score for reward models)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a model folder over HTTP with the OpenAI API: /v1/models, /v1/completions, "
                    "/v1/chat/completions (streaming with stream=true, n choices, log-probs, echo), plus /health and "
                    "Prometheus /metrics. "
                    "Concurrent requests are decoded together in one batch. A reward-model folder "
                    "(alignloop.json stage 'rm') is served on /v1/score instead.",
        epilog=examples_epilog(
            "alignloop serve --model exported/sft --port 8000",
            "ALIGNLOOP_API_KEY=secret alignloop serve --model exported/sft --host 0.0.0.0",
            "alignloop serve --model runs/rm/model --port 8001          # reward model: POST /v1/score",
            "ALIGNLOOP_API_KEY=$KEY alignloop serve --model runs/rm/model --port 8001   # PPO: "
            "reward.remote_api_key_env",
            "alignloop serve --model exported/ppo --engine vllm         # vLLM on a GPU",
            "curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' "
            "-d '{\"model\": \"sft\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'",
        ),
    )
    p.add_argument("--model", required=True, help="model folder (export output or a run's model/), hub id, "
                   ".gguf file or short name")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                   help="transformers (default, CPU or GPU) or vllm (needs vllm and a CUDA GPU)")
    p.add_argument("--served-model-name", help="the id clients pass as 'model' (default: the folder name)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request, /v1/score "
                   "included (default: env ALIGNLOOP_API_KEY, which other users cannot see in ps; none = open, "
                   "so keep the default loopback --host). PPO sends the key named by reward.remote_api_key_env")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="sequences (one per choice of a request) that may wait for a batch slot; more get "
                        "HTTP 429 (default 256)")
    p.add_argument("--max-prompt-tokens", type=int, help="longest prompt accepted (default: model context - 1)")
    p.add_argument("--max-total-prompt-tokens", type=int, default=65536,
                   help="prompt tokens of one request, all its prompts together (default 65536)")
    p.add_argument("--max-n", type=int, default=16, help="largest n (choices per prompt) a request may ask for")
    p.add_argument("--max-choices", type=int, default=128,
                   help="choices per request, prompts x n (default 128; at most --max-batch + --max-queue)")
    p.add_argument("--max-top-logprobs", type=int, default=20,
                   help="largest completions logprobs / chat top_logprobs (default 20, OpenAI's maximum)")
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request omits it")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body (default 1 MB)")
    p.set_defaults(func=run)
