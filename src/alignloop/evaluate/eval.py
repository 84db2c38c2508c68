"""The evaluation stage, top to bottom.

read prompts -> for the policy, then the baseline: load, sample one response per prompt (left padding,
KV cache, each generation call seeded by its first prompt, the same seeds for both), its test-set loss
and its benchmark scores (lm-evaluation-harness on the loaded model) -> KL(policy || reference)
on the policy's own sampled tokens -> score every response (reward model, gold function, safety
check) -> per-prompt win rates of policy over baseline -> length and diversity -> human win rates
from the feedback database -> eval.json + samples.jsonl -> FINISHED.

One model is in memory at a time, so evaluating a 7B policy against its SFT model needs the memory
of one 7B model, not three. Under torchrun each process samples, KL-scores and scores its share of the
generation calls (alignloop.generation.calls); the main process gathers them in prompt order and computes
the statistics over all of them, so N processes write what one writes.
"""

from __future__ import annotations

import gc
import logging
import math
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import gather_object

from alignloop.config import EvalConfig, ModelConfig, dump_config
from alignloop.data.formats import parse_rl_prompt, parse_sft
from alignloop.data.io import read_records
from alignloop.data.tokenize import (
    encode_prompt,
    ensure_chat_template,
    render_prompt,
    stop_token_ids,
    tokenize_sft,
)
from alignloop.errors import UserError
from alignloop.evaluate.benchmarks import lm_eval_version, run_benchmarks, task_manager
from alignloop.evaluate.judge import human_win_rates
from alignloop.evaluate.safety import SafetyCheck
from alignloop.generation.backends import make_sampler
from alignloop.generation.calls import generate_calls, my_calls, processes
from alignloop.generation.rollout import Rollout, response_logprobs
from alignloop.generation.sampler import inference_device
from alignloop.models.load import load_pretrained
from alignloop.models.reward import RewardModel
from alignloop.rl.rewards import import_callable
from alignloop.runs import RunDir, atomic_write_json, atomic_write_text, to_json
from alignloop.stats import paired_difference, paired_win_rate
from alignloop.train.sft import lm_eval

log = logging.getLogger(__name__)


@dataclass
class Prompt:
    source: str | list[dict]  # as in the record (what reward models and gold functions receive)
    text: str  # what the model is conditioned on (chat prompts rendered through the template)


@dataclass
class Generations:
    """One model's responses to every prompt."""

    name: str
    path: str
    texts: list[str]
    tokens: list[int]
    ended: list[bool]
    rollouts: list[Rollout] = field(default_factory=list)  # per generation batch, kept for the KL pass
    test: dict | None = None
    benchmarks: dict | None = None


# ---------------------------------------------------------------- inputs


def load_prompts(path: str, limit: int) -> list[Prompt]:
    prompts = []
    for rec in read_records(path):
        source = parse_rl_prompt(rec)
        prompts.append(Prompt(source, ""))  # text: rendered once the tokenizer is loaded
        if len(prompts) == limit:
            break
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def load_model(path: str, device: torch.device, chat_template: str | None):
    model, tok = load_pretrained(ModelConfig(name_or_path=path), device=device, for_training=False)
    ensure_chat_template(tok, chat_template)
    return model.to(device).eval(), tok


def release_memory() -> None:
    """After ``del model``: collect it now, so the next model loads into the memory it held."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- generation and KL


def prompt_ids(tok, prompts: Sequence[Prompt], max_len: int) -> list[list[int]]:
    return [encode_prompt(tok, p.source, max_len) for p in prompts]


def sample(model, tok, prompts: Sequence[Prompt], calls: Sequence[range], cfg: EvalConfig, name: str,
           path: str, kl_side: bool = False) -> Generations:
    """One sampled response to each prompt of ``calls`` (this process's share of the generation calls over
    ``prompts``). Each call is seeded by ``cfg.seed`` and its first prompt, so that every model draws from
    the same random streams: differences between models come from the models, not the dice. ``kl_side``:
    the log-probs kept for sequence_kl are the model's own (as it scores the reference), also where the
    sampler decoded in another precision."""
    g = cfg.generation
    stop_ids = stop_token_ids(tok, model.config, model.generation_config)
    sampler = make_sampler(model, stop_ids, tok.pad_token_id, g)
    ids = prompt_ids(tok, prompts, cfg.max_prompt_len)
    out = Generations(name, path, [], [], [])
    out.rollouts = generate_calls(sampler, ids, g, calls, cfg.seed, f"generate ({name})", keep_logprobs=True)
    for r in out.rollouts:
        if kl_side and sampler.own_numerics:
            # SmolLM2, 48 prompts: bf16 sampling log-probs against an fp32 reference moved the mean KL by 4 %,
            # both sides in bf16 by 28 % (bench/README.md)
            with torch.no_grad():
                r.logprobs = response_logprobs(model, r, g.temperature)
        out.texts += [tok.decode(row[m.bool()], skip_special_tokens=True)
                      for row, m in zip(r.response_ids, r.response_mask, strict=True)]
        out.tokens += r.response_mask.sum(1).tolist()
        out.ended += r.ended.tolist()
    return out


def sequence_kl(policy_gen: Generations, reference, temperature: float, batch_size: int) -> list[float]:
    """Per response: sum over its tokens of log p_policy - log p_ref (the sampled-token, k1 estimate of
    KL(policy || reference)); both with logits / temperature, the distribution that was sampled."""
    device = next(reference.parameters()).device
    kls: list[float] = []
    with torch.no_grad():
        for r in policy_gen.rollouts:
            for i in range(0, len(r), batch_size):
                part = r.select(list(range(i, min(i + batch_size, len(r)))))
                part = Rollout(*(t if t is None else t.to(device) for t in
                                 (part.prompt_ids, part.prompt_mask, part.response_ids, part.response_mask,
                                  part.ended, part.logprobs)))
                ref_logp = response_logprobs(reference, part, temperature)
                kls += ((part.logprobs - ref_logp) * part.response_mask).sum(1).tolist()
    return kls


def test_loss(model, tok, path: str, max_seq_len: int, batch_size: int) -> dict:
    """The SFT task metric: token-averaged loss and perplexity on SFT-format test records."""
    examples = [tokenize_sft(parse_sft(rec), tok, max_seq_len, 32, Counter()) for rec in read_records(path)]
    device = next(model.parameters()).device
    with torch.no_grad():
        result = lm_eval(model, examples, tok.pad_token_id, batch_size, device)
    return {k.removeprefix("eval_"): v for k, v in result.items()}


# ---------------------------------------------------------------- scores and statistics


def by_call(calls: Sequence[range], score: Callable[[slice], list]) -> list:
    """``score`` of each call's part of this process's items (its calls' items, in order), concatenated:
    a scorer that batches (and sorts by length) then sees the same batches whatever the process count."""
    out, start = [], 0
    for call in calls:
        out += score(slice(start, start + len(call)))
        start += len(call)
    return out


def gold_function(spec: str) -> Callable[[str, str], float | dict]:
    return import_callable(spec)


def gold_scores(fn: Callable, prompts: Sequence[Prompt], texts: Sequence[str]) -> list[dict[str, float]]:
    """Each response's gold judgement as {"total", ...components}; a dict without "total" gets the mean."""
    out = []
    for p, t in zip(prompts, texts, strict=True):
        value = fn(p.text, t)
        if isinstance(value, dict):
            parts = {k: float(v) for k, v in value.items()}
            parts.setdefault("total", statistics.fmean(parts.values()))
        else:
            parts = {"total": float(value)}
        out.append(parts)
    return out


def summary(values: Sequence[float]) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "n": len(values)}


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams over all n-grams of all responses (Li et al. 2016): 1.0 = no repeats."""
    grams: list[tuple[str, ...]] = []
    for t in texts:
        w = t.split()
        grams += [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def text_statistics(gen: Generations) -> dict:
    return {"length_tokens": summary(gen.tokens), "length_words": summary([len(t.split()) for t in gen.texts]),
            "distinct_1": distinct_n(gen.texts, 1), "distinct_2": distinct_n(gen.texts, 2),
            "no_eos_rate": 1 - statistics.fmean(gen.ended) if gen.ended else None}


# ---------------------------------------------------------------- the stage


def run_eval(cfg: EvalConfig, overwrite: bool = False) -> Path:
    run = RunDir(cfg.output_dir)
    prompts = load_prompts(cfg.prompts, cfg.max_prompts)
    gold_fn = gold_function(cfg.gold) if cfg.gold else None
    safety = SafetyCheck(cfg.safety, cfg.batch_size)
    benchmark_index = task_manager(cfg.benchmarks, cfg.benchmark_tasks) if cfg.benchmarks else None
    # Under torchrun each process samples and scores its share of the generation calls; the main process
    # gathers the per-prompt results in prompt order, computes every statistic once and writes the run.
    state = processes()
    main = state.is_main_process
    if main:
        run.prepare(overwrite)
        dump_config(cfg, run.root / "config.yaml")
    calls = my_calls(len(prompts), cfg.generation.batch_size)
    mine = [prompts[i] for call in calls for i in call]
    device = inference_device()
    reference_path = cfg.reference or cfg.baseline

    # ---- policy: generate (and its test loss)
    model, tok = load_model(cfg.policy, device, cfg.chat_template)
    for p in prompts:
        p.text = render_prompt(tok, p.source)
    runs = [sample(model, tok, prompts, calls, cfg, "policy", cfg.policy, kl_side=reference_path is not None)]
    # the test loss and the benchmarks are not per prompt: the main process computes them
    if cfg.test_data and main:
        runs[0].test = test_loss(model, tok, cfg.test_data, cfg.max_seq_len, cfg.batch_size)
    if benchmark_index is not None and main:
        runs[0].benchmarks = run_benchmarks(model, tok, cfg.benchmarks, benchmark_index, cfg.benchmark_limit,
                                            cfg.batch_size)
    vocab = len(tok)
    del model
    release_memory()

    # ---- reference (KL) and baseline (generate); one load when they are the same model
    kl: list[float] | None = None
    for path in dict.fromkeys(p for p in (reference_path, cfg.baseline) if p):
        model, tok = load_model(path, device, cfg.chat_template)
        if path == reference_path:
            if len(tok) != vocab:
                raise UserError(f"reference {path} has a different vocabulary ({len(tok)} tokens) from the "
                                f"policy ({vocab}); KL needs the same tokenizer")
            kl = sequence_kl(runs[0], model, cfg.generation.temperature, cfg.batch_size)
        if path == cfg.baseline:
            runs.append(sample(model, tok, prompts, calls, cfg, "baseline", path))
            if cfg.test_data and main:
                runs[1].test = test_loss(model, tok, cfg.test_data, cfg.max_seq_len, cfg.batch_size)
            if benchmark_index is not None and main:
                runs[1].benchmarks = run_benchmarks(model, tok, cfg.benchmarks, benchmark_index, cfg.benchmark_limit,
                                                    cfg.batch_size)
        del model
        release_memory()

    # ---- scores of this process's responses, a batched scorer one call's responses at a time
    sources = [p.source for p in mine]
    rewards: dict[str, list[float]] = {}
    if cfg.reward_model:
        rm = RewardModel.load(cfg.reward_model, device)
        rewards = {g.name: by_call(calls, lambda part, g=g: rm.score(sources[part], g.texts[part],
                                                                     batch_size=cfg.batch_size))
                   for g in runs}
        del rm
        release_memory()
    golds = {g.name: gold_scores(gold_fn, mine, g.texts) for g in runs} if gold_fn else {}
    flags = {g.name: by_call(calls, lambda part, g=g: safety(g.texts[part])) for g in runs} \
        if safety.enabled else {}

    # ---- every process's per-prompt results, in prompt order; the main process writes the run
    for g in runs:
        g.texts, g.tokens, g.ended = gather_object(g.texts), gather_object(g.tokens), gather_object(g.ended)
    kl = None if kl is None else gather_object(kl)
    rewards, golds, flags = ({name: gather_object(values) for name, values in scores.items()}
                             for scores in (rewards, golds, flags))
    if not main:
        state.wait_for_everyone()  # until the main process has written the run
        return run.root

    # ---- eval.json
    models: dict[str, dict] = {}
    for g in runs:
        m: dict = {"path": g.path, **text_statistics(g)}
        if g.name in rewards:
            m["reward_model"] = summary(rewards[g.name])
        if g.name in golds:
            keys = golds[g.name][0].keys()
            m["gold"] = {k: summary([s[k] for s in golds[g.name]]) for k in keys}
        if g.name in flags:
            m["safety"] = {"flagged": sum(flags[g.name]), "rate": statistics.fmean(flags[g.name])}
        if g.test is not None:
            m["test"] = g.test
        if g.benchmarks is not None:
            m["benchmarks"] = g.benchmarks
        models[g.name] = m
    if kl is not None:
        models["policy"]["kl"] = {**summary(kl), "reference": reference_path, "estimator": "k1 (sampled tokens)"}
    evaluation: dict = {"prompts": len(prompts), "prompts_file": cfg.prompts, "seed": cfg.seed,
                        "generation": cfg.generation.model_dump(), "models": models}
    if cfg.benchmarks:
        evaluation["benchmarks"] = {"tasks": cfg.benchmarks, "tasks_dir": cfg.benchmark_tasks,
                                    "limit": cfg.benchmark_limit, "harness": f"lm-eval {lm_eval_version()}"}
    if cfg.baseline:
        wr, gain = {}, {}
        if rewards:
            wr["reward_model"] = paired_win_rate(rewards["policy"], rewards["baseline"]).as_dict()
            gain["reward_model"] = paired_difference(rewards["policy"], rewards["baseline"]).as_dict()
        if golds:
            policy_gold, baseline_gold = ([s["total"] for s in golds[m]] for m in ("policy", "baseline"))
            wr["gold"] = paired_win_rate(policy_gold, baseline_gold).as_dict()
            gain["gold"] = paired_difference(policy_gold, baseline_gold).as_dict()
        evaluation["win_rate"] = wr
        evaluation["gain"] = gain  # policy minus baseline, per prompt
    if cfg.feedback_db:
        evaluation["human_win_rates"] = human_win_rates(cfg.feedback_db, cfg.feedback_round)

    # ---- samples.jsonl: every prompt with each model's response and scores
    lines = []
    for i, p in enumerate(prompts):
        row: dict = {"index": i, "prompt": p.source, "responses": {}}
        for g in runs:
            resp: dict = {"text": g.texts[i], "tokens": g.tokens[i], "ended_with_eos": g.ended[i]}
            if g.name in rewards:
                resp["reward_model"] = rewards[g.name][i]
            if g.name in golds:
                resp["gold"] = golds[g.name][i]
            if g.name in flags:
                resp["flagged"] = flags[g.name][i]
            if g.name == "policy" and kl is not None:
                resp["kl"] = kl[i]
            row["responses"][g.name] = resp
        lines.append(to_json(row, indent=None))
    atomic_write_text(run.root / "samples.jsonl", "".join(ln + "\n" for ln in lines))
    atomic_write_json(run.root / "eval.json", evaluation)
    run.mark_finished({"stage": "eval"})
    log.info("eval: %s", headline(evaluation))
    state.wait_for_everyone()
    return run.root


def headline(evaluation: dict) -> str:
    """One line for the terminal: the policy's scores and its win rates over the baseline."""
    pol = evaluation["models"]["policy"]
    parts = []
    for key, label in (("reward_model", "reward"), ("kl", "kl")):
        if pol.get(key, {}).get("mean") is not None:
            parts.append(f"{label} {pol[key]['mean']:.3f}")
    if "gold" in pol:
        parts.append(f"gold {pol['gold']['total']['mean']:.3f}")
    for judge, wr in evaluation.get("win_rate", {}).items():
        parts.append(f"win rate ({judge}) {wr['win_rate']:.2f} [{wr['ci_low']:.2f}, {wr['ci_high']:.2f}]")
    if "safety" in pol:
        parts.append(f"unsafe {pol['safety']['rate']:.1%}")
    for task, score in pol.get("benchmarks", {}).items():
        for metric, value in list(score["metrics"].items())[:1]:  # a task's first metric is its headline
            parts.append(f"{task} {metric} {value['value']:.3f}")
    parts.append(f"length {pol['length_tokens']['mean']:.1f} tokens")
    return ", ".join(parts)
