"""RLHF stage: PPO (or GRPO / RLOO) against a reward, with a KL leash to the reference model.

Each step, top to bottom:
  rollout     sample responses from the policy (left-padded batch, KV cache, stop on EOS)
  score       reward sources -> score per response; reference (and critic) forward on the responses
  rewards     per-token -KL penalty with the score on the last response token (PPO), or
              sequence scores turned into group / leave-one-out advantages (GRPO / RLOO)
  advantages  GAE over the critic's values, whitened
  update      ppo_epochs passes of minibatches: clipped policy loss (+ clipped value loss, entropy
              bonus, PPO-ptx LM loss), early stop when approximate KL exceeds its bound
  log         metrics.jsonl / trackers; samples.jsonl every N steps
  checkpoint  policy, critic, optimizer, scheduler, KL controller, RNG and prompt position
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from alignloop.config import ModelConfig, PPOConfig, dump_config
from alignloop.data.formats import parse_rl_prompt, parse_sft
from alignloop.data.io import Record, read_records
from alignloop.data.split import split_by_seed
from alignloop.data.tokenize import (
    collate_padded,
    ensure_chat_template,
    render_prompt,
    tokenize_sft,
)
from alignloop.errors import TrainingDiverged, UserError
from alignloop.models.forward import _body_and_head, causal_lm_loss_sum
from alignloop.models.load import count_parameters, load_pretrained, prepare_for_training, save_model
from alignloop.rl import ppo_math as pm
from alignloop.rl.rewards import build_reward, reward_model_dir
from alignloop.rl.rollout import Rollout, SamplingSettings, generate, scatter_response, sequence_inputs
from alignloop.runs import MetricsLog, RunDir, atomic_write_json
from alignloop.train.checkpoint import Checkpointer, load_trainable_state, trainable_state
from alignloop.train.core import build_optimizer, build_scheduler, epoch_batches, make_accelerator

log = logging.getLogger(__name__)
TIMING_KEYS = ("time_generation", "time_scoring", "time_reward", "time_training", "time_step", "samples_per_sec")


# ---------------------------------------------------------------- data


@dataclass
class Prompt:
    source: str | list[dict]  # as in the record: what reward sources receive
    text: str  # what the policy is conditioned on (chat prompts rendered through the template)
    ids: list[int]
    columns: dict  # the record's other fields, passed to reward functions


def read_prompts(cfg: PPOConfig) -> tuple[list[Record], list[Record]]:
    """Read and validate every prompt record (train, held out) before any model is loaded."""
    def read(path: str) -> list[Record]:
        records = read_records(path, cfg.data.format, cfg.data.column_map)
        for rec in records:
            parse_rl_prompt(rec)
        if not records:
            raise UserError(f"{path}: no prompts")
        return records

    train = read(cfg.data.train)
    if cfg.data.eval:
        held_out = read(cfg.data.eval)
    else:
        train, held_out, _ = split_by_seed(train, cfg.data.eval_fraction, 0.0, cfg.train.seed)
    return train, held_out[: cfg.data.max_eval_prompts]


def tokenize_prompts(records: list[Record], tokenizer, max_len: int) -> list[Prompt]:
    out = []
    for rec in records:
        prompt = parse_rl_prompt(rec)
        text = render_prompt(tokenizer, prompt)
        ids = tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"]
        columns = {k: v for k, v in rec.data.items() if k not in ("prompt", "messages")}
        out.append(Prompt(prompt, text, ids[-max_len:], columns))  # keep the end: the response follows it
    return out


def column_lists(prompts: list[Prompt]) -> dict[str, list]:
    keys = set().union(*(p.columns for p in prompts))
    return {k: [p.columns.get(k) for p in prompts] for k in sorted(keys)}


# ---------------------------------------------------------------- models


class ValueModel(nn.Module):
    """Per-token values: a transformer body's hidden states through a 1-output head. With no body
    of its own it reads the policy's hidden states (ppo.critic=policy_head)."""

    def __init__(self, body: nn.Module | None, head: nn.Linear):
        super().__init__()
        self.body = body
        self.head = head

    def values(self, r: Rollout, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Values [B, R] of the states before each response token, 0 on padding."""
        if hidden is None:
            hidden = response_hidden(self.body, r)
        return scatter_response(self.head(hidden).squeeze(-1).float(), r.response_mask)


def response_hidden(body: nn.Module, r: Rollout) -> torch.Tensor:
    """Hidden states [N, H] at the positions that predict the N response tokens."""
    x = sequence_inputs(r)
    hidden = body(input_ids=x["input_ids"], attention_mask=x["attention_mask"], position_ids=x["position_ids"],
                  use_cache=False).last_hidden_state
    return hidden[:, :-1][x["select"]]


def critic_from_reward_model(path: str, device: torch.device, policy_tokenizer) -> ValueModel:
    """The reward model's body and score head, rescaled so the initial value is the reward model's
    normalised reward (criteria heads combined with their weights, as RewardModel.score does). The critic
    reads the policy's token ids, so the reward model must share the policy's tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from alignloop.models.load import read_meta

    folder = reward_model_dir(path)
    rm, rm_tokenizer = load_pretrained(ModelConfig(name_or_path=str(folder), dropout=0.0),
                                       auto_cls=AutoModelForSequenceClassification, device=device, for_training=True)
    if rm_tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        raise UserError(f"{folder}: the critic starts from this reward model, but its tokenizer is not the "
                        "policy's (the critic reads the policy's tokens); set ppo.critic=policy_head, or "
                        "ppo.critic_model to a sequence-classification model with the policy's tokenizer")
    if isinstance(rm, PeftModel):
        rm = rm.merge_and_unload()
    score = getattr(rm, "score", None) or getattr(rm, "classifier", None)
    if not isinstance(score, nn.Linear):
        raise UserError(f"{folder}: reward model has no linear score head to start the critic from")
    meta = read_meta(folder)
    norm = meta.get("normalization") or {}
    mean, std = float(norm.get("mean", 0.0)), float(norm.get("std", 1.0)) or 1.0
    weights = torch.tensor(meta.get("criteria_weights") or [1.0] * score.out_features, dtype=score.weight.dtype,
                           device=score.weight.device)
    if weights.numel() != score.out_features:
        raise UserError(f"{folder}: {weights.numel()} criteria weights for a score head with "
                        f"{score.out_features} outputs")
    head = nn.Linear(score.in_features, 1, bias=True, device=device)
    with torch.no_grad():
        # One linear head can say exactly what the reward model says: (weights . (W h + b) - mean) / std.
        # A fresh head instead starts with values as far off as the scores vary, and the advantages built
        # from them pushed the reward down over the first PPO steps.
        head.weight.copy_((weights @ score.weight).unsqueeze(0) / std)
        bias = float(weights @ score.bias) if score.bias is not None else 0.0
        head.bias.fill_((bias - mean) / std)
    return ValueModel(no_dropout(rm.base_model), head)


def policy_value_head(policy: nn.Module) -> ValueModel:
    hidden = policy.get_input_embeddings().embedding_dim
    head = nn.Linear(hidden, 1, device=next(policy.parameters()).device)
    with torch.no_grad():
        # Zero: a random head's values differ from token to token by as much as the scores do, and GAE
        # turns those differences into advantages that steer the policy before the critic has learnt anything.
        head.weight.zero_()
        head.bias.zero_()
    return ValueModel(None, head)


def no_dropout(model: nn.Module) -> nn.Module:
    """Dropout modules (LoRA's included) to p=0: the same input must give the same log-probabilities in
    the rollout, the reference and every PPO epoch."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_policy_and_reference(cfg: PPOConfig, device: torch.device) -> tuple[nn.Module, nn.Module | None, object]:
    """(policy, reference, tokenizer); the reference is the starting policy, frozen. Dropout is off in both.

    A fresh LoRA policy has no separate reference: the same base weights with the adapter disabled are
    the starting policy, so only one copy of them is held. A policy that continues an adapter run (a
    LoRA SFT or an earlier PPO round) trains that adapter on: disabling it would give the bare base
    model, so the reference is a frozen copy with the starting adapter merged in."""
    policy, tok = load_pretrained(cfg.model.model_copy(update={"dropout": 0.0}), device=device, for_training=True)
    ensure_chat_template(tok, cfg.data.chat_template)
    if hasattr(policy, "disable_adapter"):
        ref = frozen(copy.deepcopy(policy).merge_and_unload())
    elif cfg.model.adapter in ("lora", "qlora"):
        ref = None
    else:
        ref = frozen(copy.deepcopy(policy))
    return no_dropout(prepare_for_training(policy, cfg.model)), ref, tok


def ptx_batches(path: str, tokenizer, batch_size: int, seed: int):
    """Endless seeded stream of SFT batches for PPO-ptx, indexed so resume is exact."""
    from collections import Counter

    examples = [tokenize_sft(parse_sft(r), tokenizer, 1024, 32, Counter()) for r in read_records(path)]
    order = epoch_batches(len(examples), batch_size, seed, 0)

    def batch(i: int) -> dict:
        return collate_padded([examples[j] for j in order[i % len(order)]], tokenizer.pad_token_id)

    return batch


# ---------------------------------------------------------------- the stage


def run_ppo(cfg: PPOConfig, overwrite: bool = False) -> Path:
    p, g = cfg.ppo, cfg.generation
    train_records, eval_records = read_prompts(cfg)
    prompts_per_step = p.rollout_size // p.samples_per_prompt
    if len(train_records) < prompts_per_step:
        raise UserError(f"{cfg.data.train}: {len(train_records)} training prompts, but a rollout needs "
                        f"{prompts_per_step} (ppo.rollout_size / ppo.samples_per_prompt)")
    run = RunDir(cfg.output_dir)
    tcfg = cfg.train.core()
    acc = make_accelerator(tcfg, run)
    if acc.num_processes > 1:
        raise UserError("alignloop ppo runs in a single process for now (drop --nproc)")
    device = acc.device
    torch.manual_seed(cfg.train.seed)

    policy, ref, tok = load_policy_and_reference(cfg, device)
    critic: ValueModel | None = None
    if p.algorithm == "ppo":
        critic = critic_from_reward_model(p.critic_model or cfg.reward.model, device, tok) if p.critic == "reward_model" \
            else policy_value_head(policy)
    reward = build_reward(cfg.reward, device)
    train_prompts = tokenize_prompts(train_records, tok, cfg.data.max_prompt_len)
    eval_prompts = tokenize_prompts(eval_records, tok, cfg.data.max_prompt_len)
    ptx = ptx_batches(cfg.data.ptx, tok, p.ptx_batch_size, cfg.train.seed) if p.ptx_coef > 0 else None
    sampling = SamplingSettings(g.max_new_tokens, g.temperature, g.top_k, g.top_p, g.stop_on_eos)
    scoring_batch = g.batch_size or p.rollout_size  # no-grad reference / critic forwards, batched as generation

    optimizer = build_optimizer(list(policy.named_parameters()), tcfg)
    if critic is not None:  # one optimizer, so one state file restores both
        critic_cfg = tcfg.model_copy(update={"lr": p.critic_lr or tcfg.lr})
        for group in build_optimizer(list(critic.named_parameters()), critic_cfg).param_groups:
            optimizer.add_param_group({k: v for k, v in group.items() if k != "initial_lr"})
    updates_per_step = p.ppo_epochs * (p.rollout_size // p.mini_batch_size)
    scheduler = build_scheduler(optimizer, tcfg, p.steps * updates_per_step)
    kl_ctl = pm.KLController(p.kl_coef, p.kl_target, p.kl_horizon)
    ema = {n: t.clone() for n, t in trainable_state(policy).items()} if p.ema_decay else None

    run.prepare(overwrite)
    ckpt = Checkpointer(run.checkpoints, cfg.train.save_total_limit)
    metrics = MetricsLog(run.metrics_path)
    samples_log = MetricsLog(run.root / "samples.jsonl")
    dump_config(cfg, run.root / "config.yaml")
    params = count_parameters(policy)
    log.info("policy: %s parameters, %s trainable; %d training prompts, %d held out", f"{params['total']:,}",
             f"{params['trainable']:,}", len(train_prompts), len(eval_prompts))

    def reference_logprobs(r: Rollout) -> torch.Tensor:
        with torch.no_grad(), acc.autocast():
            if ref is not None:
                return _micro(r, scoring_batch, lambda m: _logprobs(ref, m, g.temperature))
            with policy.disable_adapter():
                return _micro(r, scoring_batch, lambda m: _logprobs(policy, m, g.temperature))

    def held_out_reward() -> float | None:
        """Mean reward of sampled responses to the held-out prompts, with a fixed seed (same draws before
        and after training) and without touching the training RNG stream."""
        if not eval_prompts:
            return None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed + 1)
            policy.eval()
            r = generate(policy, [q.ids for q in eval_prompts], sampling, tok.eos_token_id, tok.pad_token_id,
                         g.batch_size, keep_logprobs=False)
            score, _ = reward([q.source for q in eval_prompts], decode(tok, r), column_lists(eval_prompts))
        return score.mean().item()

    state = {"step": 0, "epoch": 0, "position": 0, "negative_kl_streak": 0}
    latest = ckpt.latest()
    if latest is not None:
        saved = ckpt.load(latest, policy, optimizer)
        scheduler.load_state_dict(saved["scheduler"])
        kl_ctl.load_state_dict(saved["kl_controller"])
        if critic is not None:
            load_trainable_state(critic, ckpt.load_extra(latest, "critic"))
        if ema is not None:
            ema = ckpt.load_extra(latest, "ema")
        state = saved["loop"]
        metrics.truncate_after(state["step"])
        samples_log.truncate_after(state["step"])
        log.info("resuming from %s (step %d of %d)", latest, state["step"], p.steps)
    else:
        state["eval_reward_before"] = held_out_reward()
        metrics.truncate_after(0)
        samples_log.truncate_after(0)
    if acc.trackers:
        acc.init_trackers("alignloop", config={"algorithm": p.algorithm, "lr": tcfg.lr, "kl_coef": p.kl_coef})

    def checkpoint() -> None:
        extra = {"critic": trainable_state(critic)} if critic is not None else {}
        if ema is not None:
            extra["ema"] = ema
        ckpt.save(state["step"], policy, optimizer, {"scheduler": scheduler.state_dict(), "loop": state,
                                                      "kl_controller": kl_ctl.state_dict()}, extra)

    def diverged(what: str) -> TrainingDiverged:
        kept = ckpt.latest()
        keep = f"the last good checkpoint is kept at {kept}" if kept else "no checkpoint had been written yet"
        return TrainingDiverged(f"PPO diverged at step {state['step'] + 1}: {what}; stopped ({keep}); lower "
                                "train.lr or raise the KL coefficient, then rerun to resume")

    from tqdm.auto import tqdm

    bar = tqdm(total=p.steps, initial=state["step"], desc=p.algorithm, dynamic_ncols=True, leave=False)
    t_prev = time.perf_counter()
    while state["step"] < p.steps:
        # ---- rollout: the next prompts in a seeded order, each repeated samples_per_prompt times
        plan = [b for b in epoch_batches(len(train_prompts), prompts_per_step, cfg.train.seed, state["epoch"])
                if len(b) == prompts_per_step]
        if state["position"] >= len(plan):
            state["epoch"], state["position"] = state["epoch"] + 1, 0
            continue
        batch = [train_prompts[i] for i in plan[state["position"]] for _ in range(p.samples_per_prompt)]
        t0 = time.perf_counter()
        policy.eval()
        with acc.autocast():
            r = generate(policy, [q.ids for q in batch], sampling, tok.eos_token_id, tok.pad_token_id,
                         g.batch_size, keep_logprobs=True)
        r = _to(r, device)
        old_logp = r.logprobs
        t1 = time.perf_counter()

        # ---- score: reward sources, reference log-probs, critic values
        responses = decode(tok, r)
        score, source_means = reward([q.source for q in batch], responses, column_lists(batch))
        score = score.to(device)
        t_reward = time.perf_counter() - t1
        if not torch.isfinite(score).all():
            raise diverged("the reward is NaN/inf")
        ref_logp = reference_logprobs(r)
        old_values = None
        if critic is not None:
            with torch.no_grad(), acc.autocast():
                old_values = _micro(r, scoring_batch, lambda m: _values(policy, critic, m))
        t2 = time.perf_counter()

        # ---- rewards and advantages
        mask = r.response_mask.float()
        raw_score = score.clone()
        if p.missing_eos_penalty is not None:
            score = torch.where(r.ended, score, score - p.missing_eos_penalty)
        if p.reward_clip is not None:
            score = score.clamp(-p.reward_clip, p.reward_clip)
        if p.whiten_rewards:
            score = score / (score.std() + 1e-8)
        kl = pm.kl_estimate(old_logp, ref_logp, p.kl_estimator) * mask
        seq_kl = kl.sum(1)
        returns = None
        if p.algorithm == "ppo":
            rewards, _ = pm.kl_penalised_rewards(score, old_logp, ref_logp, mask, kl_ctl.coef, p.kl_estimator)
            advantages, returns = pm.gae(rewards, old_values, mask, p.gamma, p.lam)
            total_reward = rewards.sum(1)
        else:
            if p.algorithm == "rloo":  # KL folded into the sequence reward (Ahmadian et al. 2024)
                total_reward = score - kl_ctl.coef * seq_kl
                seq_adv = pm.leave_one_out_advantages(total_reward, p.samples_per_prompt)
            else:  # GRPO: KL is a loss term instead
                total_reward = score
                seq_adv = pm.group_advantages(score, p.samples_per_prompt, p.grpo_scale_rewards)
            advantages = seq_adv[:, None] * mask
        if p.whiten_advantages and p.algorithm != "grpo":
            advantages = pm.masked_whiten(advantages, mask)

        # ---- PPO epochs over shuffled minibatches
        policy.train()
        sums: dict[str, float] = defaultdict(float)
        n_updates, stopped_early = 0, False
        n_micro = p.mini_batch_size // p.micro_batch_size
        for _epoch in range(p.ppo_epochs):
            perm = torch.randperm(len(r))
            for start in range(0, len(r), p.mini_batch_size):
                mb_kl = 0.0
                for m0 in range(start, start + p.mini_batch_size, p.micro_batch_size):
                    idx = perm[m0: m0 + p.micro_batch_size]
                    m = r.select(idx)
                    m_mask = mask[idx]
                    with acc.autocast():
                        loss, stats = _micro_loss(policy, critic, m, m_mask, old_logp[idx], ref_logp[idx],
                                                  advantages[idx], None if returns is None else returns[idx],
                                                  None if old_values is None else old_values[idx], kl_ctl.coef, p,
                                                  g.temperature)
                        if ptx is not None:
                            ptx_batch = {k: v.to(device) if torch.is_tensor(v) else v
                                         for k, v in ptx(state.setdefault("ptx_position", 0)).items()}
                            state["ptx_position"] += 1
                            lm_sum, lm_n = causal_lm_loss_sum(policy, ptx_batch)
                            loss = loss + p.ptx_coef * lm_sum / max(lm_n, 1)
                            stats["ptx_loss"] = lm_sum.item() / max(lm_n, 1)
                    if not torch.isfinite(loss):
                        raise diverged(f"the loss is {loss.item()}")
                    (loss / n_micro).backward()
                    for k, v in stats.items():
                        sums[k] += v / n_micro
                    mb_kl += stats["approx_kl"] / n_micro
                policy_norm = _clip(policy, tcfg.max_grad_norm)
                if critic is not None:
                    _clip(critic, tcfg.max_grad_norm)
                if not math.isfinite(policy_norm):
                    raise diverged(f"the gradient norm is {policy_norm}")
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                n_updates += 1
                if p.max_approx_kl is not None and mb_kl > p.max_approx_kl:
                    stopped_early = True
                    break
            if stopped_early:
                break
        if ema is not None:
            with torch.no_grad():
                for n, param in policy.named_parameters():
                    if n in ema:
                        ema[n].mul_(p.ema_decay).add_(param.detach().cpu(), alpha=1 - p.ema_decay)
        t3 = time.perf_counter()

        # ---- log, KL controller, samples, checkpoint
        mean_kl = seq_kl.mean().item()
        state["negative_kl_streak"], warn = pm.negative_kl_streak(state["negative_kl_streak"], mean_kl,
                                                                  p.negative_kl_patience)
        if warn:
            log.warning("the KL estimate has been negative for %d steps (%.4f): the policy log-probabilities "
                        "do not match the sampler's; check generation settings (temperature, top_k/top_p)",
                        p.negative_kl_patience, mean_kl)
        state["step"] += 1
        state["position"] += 1
        record = {"step": state["step"], "algorithm": p.algorithm,
                  "score_mean": raw_score.mean().item(), "score_std": raw_score.std().item(),
                  **{f"reward_{k}": v for k, v in source_means.items()},
                  "reward_total": total_reward.mean().item(), "kl": mean_kl, "kl_estimator": p.kl_estimator,
                  "kl_coef": kl_ctl.coef,
                  "response_length": r.response_mask.sum(1).float().mean().item(),
                  "no_eos_frac": 1 - r.ended.float().mean().item(),
                  **{k: v / max(n_updates, 1) for k, v in sums.items()},
                  "ppo_updates": n_updates, "update_stopped_early": stopped_early,
                  "lr": scheduler.get_last_lr()[0]}
        if returns is not None:
            record["explained_variance"] = pm.explained_variance(old_values, returns, mask)
        record.update({"time_generation": t1 - t0, "time_scoring": t2 - t1, "time_reward": t_reward,
                       "time_training": t3 - t2,
                       "samples_per_sec": len(r) / (t3 - t0),
                       # wall time since the previous step's record: includes its logging and checkpoint
                       "time_step": t3 - t_prev})
        t_prev = t3
        kl_ctl.update(mean_kl, len(r))
        if state["step"] % cfg.train.log_steps == 0 or state["step"] == p.steps:
            metrics.write(record)
            acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=state["step"])
        if cfg.train.samples_to_log and (state["step"] % cfg.train.sample_steps == 0 or state["step"] == 1):
            for i in range(min(cfg.train.samples_to_log, len(r))):
                samples_log.write({"step": state["step"], "prompt": batch[i].text, "response": responses[i],
                                   "score": raw_score[i].item(), "kl": seq_kl[i].item(),
                                   "ended_with_eos": bool(r.ended[i])})
        bar.update(1)
        bar.set_postfix(score=f"{record['score_mean']:.3f}", kl=f"{mean_kl:.3f}")
        if state["step"] % cfg.train.save_steps == 0 or state["step"] == p.steps:
            checkpoint()
    bar.close()

    # ---- final model and evaluation
    if ema is not None:
        load_trainable_state(policy, {n: t.to(device) for n, t in ema.items()})
    evaluation = {"algorithm": p.algorithm, "steps": state["step"], "held_out_prompts": len(eval_prompts),
                  "reward_before": state["eval_reward_before"], "reward_after": held_out_reward(),
                  "parameters": params}
    atomic_write_json(run.root / "eval.json", evaluation)
    policy.eval()
    save_model(policy, tok, run.model_dir, meta={"stage": "ppo", "algorithm": p.algorithm,
                                                 "base_model": cfg.model.name_or_path, "adapter": cfg.model.adapter})
    acc.end_training()
    run.mark_finished({"stage": "ppo"})
    return run.root


# ---------------------------------------------------------------- helpers


def decode(tok, r: Rollout) -> list[str]:
    return [tok.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(r.response_ids, r.response_mask, strict=True)]


def _to(r: Rollout, device: torch.device) -> Rollout:
    return Rollout(*(t if t is None else t.to(device) for t in (r.prompt_ids, r.prompt_mask, r.response_ids,
                                                                 r.response_mask, r.ended, r.logprobs)))


def _micro(r: Rollout, size: int, fn) -> torch.Tensor:
    """Run fn over micro-batches of rows and stack the [b, R] results back into [B, R]."""
    return torch.cat([fn(r.select(list(range(i, min(i + size, len(r)))))) for i in range(0, len(r), size)])


def _policy_forward(policy: nn.Module, r: Rollout, want_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits [N, V] at response tokens only, and (for a value head on the policy) the hidden states."""
    if not want_hidden:
        from alignloop.rl.rollout import response_logits

        return response_logits(policy, r), None
    parts = _body_and_head(policy)
    if parts is None:
        raise UserError("ppo.critic=policy_head is not supported for this model; use ppo.critic=reward_model")
    body, head = parts
    hidden = response_hidden(body, r)
    return head(hidden), hidden


def _logprobs(model: nn.Module, r: Rollout, temperature: float) -> torch.Tensor:
    logits, _ = _policy_forward(model, r, False)
    ids = r.response_ids[r.response_mask.bool()]
    return scatter_response(pm.logprobs_from_logits(logits, ids, temperature), r.response_mask)


def _values(policy: nn.Module, critic: ValueModel, r: Rollout) -> torch.Tensor:
    if critic.body is not None:
        return critic.values(r)
    _, hidden = _policy_forward(policy, r, True)
    return critic.values(r, hidden)


def _micro_loss(policy, critic, m: Rollout, mask, old_logp, ref_logp, advantages, returns, old_values, kl_coef,
                p, temperature) -> tuple[torch.Tensor, dict[str, float]]:
    head_on_policy = critic is not None and critic.body is None
    logits, hidden = _policy_forward(policy, m, head_on_policy)
    ids = m.response_ids[m.response_mask.bool()]
    logp = scatter_response(pm.logprobs_from_logits(logits, ids, temperature), m.response_mask)
    loss, st = pm.policy_loss(logp, old_logp, advantages, mask, p.clip_range)
    entropy = pm.entropy_from_logits(logits.detach() if p.entropy_coef == 0 else logits, temperature).mean()
    stats = {"policy_loss": loss.item(), "clip_frac": st["clip_frac"].item(), "approx_kl": st["approx_kl"].item(),
             "entropy": entropy.item()}
    if p.entropy_coef:
        loss = loss - p.entropy_coef * entropy
    if p.algorithm == "grpo" and kl_coef:
        kl_term = pm.masked_mean(pm.kl_estimate(logp, ref_logp, "k3"), mask)
        loss = loss + kl_coef * kl_term
    if critic is not None:
        values = critic.values(m, hidden) if head_on_policy else critic.values(m)
        vloss, vst = pm.value_loss(values, old_values, returns, mask, p.value_clip_range)
        loss = loss + p.vf_coef * vloss
        stats.update(value_loss=vloss.item(), vf_clip_frac=vst["vf_clip_frac"].item())
    return loss, stats


def _clip(model: nn.Module, max_norm: float | None) -> float:
    params = [q for q in model.parameters() if q.grad is not None]
    if not params:
        return 0.0
    if max_norm is None:
        return float(torch.norm(torch.stack([q.grad.detach().norm() for q in params])))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

