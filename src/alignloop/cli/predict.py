"""``alignloop predict``: a trained SFT model's predictions over a file (labels, tags or completions)."""

from __future__ import annotations

import argparse

from alignloop.cli.common import examples_epilog
from alignloop.config import SamplingConfig, sampling_from_flags


def run(args: argparse.Namespace) -> int:
    from alignloop.predict import predict  # torch: only once the command runs

    sampling = sampling_from_flags(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, backend=args.backend)
    out = predict(args.model, args.data, args.output, args.format, args.batch_size, sampling)
    print(f"predictions: {out}")
    return 0


def add_command(sub) -> None:
    p = sub.add_parser(
        "predict", help="predictions of a trained SFT model (labels, tags or generated completions)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a trained model over a data file. Classification writes the label and class "
                    "probabilities, tagging one tag per word, a causal LM its completion of the prompt.",
        epilog=examples_epilog(
            "alignloop predict --model runs/cls/model --data reviews.jsonl --output predictions.jsonl",
            "alignloop predict --model runs/ner/model --data test.conll --format conll --output tags.jsonl",
            "alignloop predict --model runs/sft/model --data prompts.jsonl --output gen.jsonl "
            "--temperature 0.7 --top-p 0.9",
        ),
    )
    p.add_argument("--model", required=True, help="a run's model/ folder")
    p.add_argument("--data", required=True, help="input file: text (classification), tokens (tagging), "
                   "prompt or messages (causal LM)")
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "csv", "parquet", "dataset", "conll"])
    p.add_argument("--batch-size", type=int, default=32)
    defaults = SamplingConfig()
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                   help="causal LM: tokens to generate (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="causal LM: 0 = greedy (the default), "
                   "above 0 = sampling")
    p.add_argument("--top-k", type=int, default=defaults.top_k, help="causal LM: 0 = off (default)")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help="causal LM: nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="causal LM: sampling seed")
    p.add_argument("--backend", choices=["transformers", "vllm"], default=defaults.backend,
                   help="causal LM: who samples, the model itself or a vLLM engine (needs vllm; default "
                        "%(default)s)")
    p.set_defaults(func=run)
