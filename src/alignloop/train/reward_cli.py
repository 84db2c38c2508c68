"""``alignloop rm`` (train a reward model) and ``alignloop score`` (score records with one)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from alignloop.cli import add_training_flags, examples_epilog, run_training_command

RM_HELP = """\
Train a reward model from human feedback. Records (mixed in one file if you like):
  pair      {"prompt", "chosen", "rejected", "margin"?, "criterion"?, "annotator"?}
  HH-RLHF   {"chosen", "rejected"}: full dialogues, split at the last "\\n\\nAssistant:"
  ranking   {"prompt", "responses": [K], "ranking": [best .. worst]}; a nested list is a tie: [2, [0, 3], 1]
  rating    {"prompt", "response", "scores": {criterion: value}} or {"prompt", "response", "score"}
Prompts are text or chat messages. The model/ folder is a transformers sequence-classification model
(one head, or one per criterion with multi_criteria=true) plus normalisation statistics."""


def _cmd_rm(args: argparse.Namespace) -> int:
    from alignloop.config import RMConfig, build_config

    flags = {"model.name_or_path": args.model, "data.train": args.data, "data.eval": args.eval_data,
             "data.test": args.test_data, "output_dir": args.output}
    cfg = build_config(RMConfig, args.config, flags, args.overrides)

    def run():
        from alignloop.train.reward import run_rm

        return run_rm(cfg, overwrite=args.overwrite)

    return run_training_command(args, run)


def _scoring_inputs(rec) -> tuple[list, list[str], str]:
    """(prompts, responses, where to put the rewards) for one record of any feedback layout."""
    from alignloop.data.formats import (
        PreferencePair,
        PromptResponse,
        Ranking,
        parse_feedback,
        validate_record,
    )

    keys = rec.data.keys()
    if "response" in keys and "scores" not in keys and "score" not in keys:
        r = validate_record(PromptResponse, rec)
        return [r.prompt], [r.response], "reward"
    fb = parse_feedback(rec)
    prompt = fb.prompt if isinstance(fb.prompt, str) else [m.model_dump() for m in fb.prompt]
    if isinstance(fb, PreferencePair):
        return [prompt, prompt], [fb.chosen, fb.rejected], "pair"
    if isinstance(fb, Ranking):
        return [prompt] * len(fb.responses), list(fb.responses), "rewards"
    return [prompt], [fb.response], "reward"


def _cmd_score(args: argparse.Namespace) -> int:
    from alignloop.data.io import read_records
    from alignloop.models.reward import RewardModel
    from alignloop.runs import atomic_write_text

    records = read_records(args.data)
    inputs = [_scoring_inputs(r) for r in records]  # validate everything before loading the model
    rm = RewardModel.load(args.model, device=args.device)
    # One scoring pass over every response (length-grouped batches), then back to the records.
    prompts = [p for ps, _, _ in inputs for p in ps]
    responses = [r for _, rs, _ in inputs for r in rs]
    rewards = rm.score(prompts, responses, batch_size=args.batch_size)
    lines, at = [], 0
    for rec, (_, rs, kind) in zip(records, inputs, strict=True):
        mine, at = rewards[at : at + len(rs)], at + len(rs)
        out = dict(rec.data)
        if kind == "pair":
            out["chosen_reward"], out["rejected_reward"] = mine
        elif kind == "rewards":
            out["rewards"] = mine
        else:
            out["reward"] = mine[0]
        lines.append(json.dumps(out, ensure_ascii=False))
    atomic_write_text(Path(args.output), "".join(ln + "\n" for ln in lines))
    print(f"scored {len(records)} records: {args.output}")
    return 0


def add_command(sub) -> None:
    p = sub.add_parser(
        "rm", help="train a reward model from pairs, rankings and ratings",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=RM_HELP,
        epilog=examples_epilog(
            "alignloop rm -c examples/rm.yaml",
            "alignloop rm --model runs/sft/model --data feedback.jsonl --output runs/rm train.lr=1e-5",
            "alignloop rm --model smollm2-135m-instruct --data hh.jsonl --output runs/rm model.adapter=lora "
            "multi_criteria=true",
        ),
    )
    add_training_flags(p)
    p.set_defaults(func=_cmd_rm)

    s = sub.add_parser(
        "score", help="score records with a trained reward model (normalised rewards, JSONL out)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Adds the normalised reward to every record: 'reward' for {prompt, response}, "
                    "'chosen_reward'/'rejected_reward' for pairs, 'rewards' for rankings.",
        epilog=examples_epilog("alignloop score --model runs/rm/model --data samples.jsonl --output scored.jsonl"),
    )
    s.add_argument("--model", required=True, help="a reward run's model/ folder")
    s.add_argument("--data", required=True, help="records to score (jsonl/csv/parquet/saved dataset)")
    s.add_argument("--output", required=True, help="JSONL file to write")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    s.set_defaults(func=_cmd_score)
