"""RLHF stage: PPO (or GRPO / RLOO) against a reward, with a KL leash to the reference model.

Each step, top to bottom:
  rollout     sample responses from the policy (left-padded batch, KV cache, stop on EOS)
  score       reward sources -> score per response; reference (and critic) forward on the responses;
              with one PPO epoch over one minibatch, a separate critic's values come from its training
              forward instead (its update is made then)
  rewards     per-token -KL penalty with the score on the last response token (PPO), or
              sequence scores turned into group / leave-one-out advantages (GRPO / RLOO)
  advantages  GAE over the critic's values, whitened
  update      ppo_epochs passes of minibatches: clipped policy loss (+ clipped value loss, entropy
              bonus, PPO-ptx LM loss), early stop when approximate KL exceeds its bound
  log         metrics.jsonl / trackers; samples.jsonl every N steps
  checkpoint  policy, critic, optimizer, scheduler, KL controller, RNG and prompt position
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import gather_object
from peft import PeftModel
from torch import nn
from transformers import AutoModelForSequenceClassification

from alignloop.config import ModelConfig, PPOConfig
from alignloop.data.batching import length_batches
from alignloop.data.formats import parse_rl_prompt, parse_sft
from alignloop.data.io import Record, read_records
from alignloop.data.splits import split_by_seed
from alignloop.data.tokenize import (
    collate_padded,
    encode_prompt,
    ensure_chat_template,
    render_prompt,
    stop_token_ids,
    tokenize_sft,
)
from alignloop.errors import UserError
from alignloop.generation.backends import make_sampler
from alignloop.generation.calls import rollout_seed, seeded
from alignloop.generation.rollout import (
    Rollout,
    response_logits,
    scatter_response,
    sequence_inputs,
)
from alignloop.models.attention import use_training_sdpa
from alignloop.models.forward import body_and_lm_head, causal_lm_loss_sum, is_parallel_wrapped
from alignloop.models.load import (
    count_parameters,
    load_pretrained,
    planned_matmul_parameters,
    prepare_for_training,
    read_meta,
    save_model,
)
from alignloop.models.reward import combine_criteria
from alignloop.models.token_logprobs import token_logprobs, token_logprobs_and_entropy
from alignloop.rl import ppo_math as pm
from alignloop.rl.rewards import build_reward, reward_model_dir
from alignloop.runs import MetricsLog, RunDir
from alignloop.training.accelerator import make_accelerator
from alignloop.training.batch_order import epoch_batches
from alignloop.training.checkpoint import Checkpointer, load_trainable_state, trainable_state
from alignloop.training.distributed import PARAM_DTYPES, full_parameters, wrap_for_training
from alignloop.training.divergence import DivergenceCheck
from alignloop.training.finish import finish_run
from alignloop.training.logger import StepLogger
from alignloop.training.optim import build_optimizer, build_scheduler, optimizer_step, param_groups
from alignloop.training.resume import OUTPUT_KEYS, open_run, resume

log = logging.getLogger(__name__)
TIMING_KEYS = ("time_generation", "time_scoring", "time_reward", "time_training", "time_step", "samples_per_sec",
               "time_weight_sync")
# Settings a resumed run may change: the loop reads them from the config at every step, ``resume`` puts the
# learning rates (train.lr, ppo.critic_lr) into the restored optimizer and schedule, and run_ppo puts the KL
# target and horizon (and a changed starting coefficient) into the restored KL controller.
PPO_MUTABLE = OUTPUT_KEYS | frozenset({
    "train.lr", "train.max_grad_norm", "train.sample_steps", "train.samples_to_log", "ppo.steps", "ppo.critic_lr",
    "ppo.kl_coef", "ppo.kl_target", "ppo.kl_horizon", "reward.remote_timeout", "train.gradient_checkpointing"})


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
        columns = {k: v for k, v in rec.data.items() if k not in ("prompt", "messages")}
        out.append(Prompt(prompt, render_prompt(tokenizer, prompt), encode_prompt(tokenizer, prompt, max_len),
                          columns))
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

    def forward(self, r: Rollout, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Values [B, R] of the states before each response token, 0 on padding. Training calls the
        module (not a method) so that, wrapped for DDP, its gradients are averaged over processes."""
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
        head.weight.copy_(combine_criteria(score.weight.T, weights, std=std).unsqueeze(0))
        bias = score.bias if score.bias is not None else torch.zeros_like(weights)
        # In float64, then rounded once into the head (a bf16 reward model's bias keeps its precision).
        head.bias.copy_(combine_criteria(bias.double(), weights.double(), mean, std).unsqueeze(0))
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
    acc = make_accelerator(tcfg, run, matmul_parameters=planned_matmul_parameters(cfg.model))
    world, rank = acc.num_processes, acc.process_index
    share = check_process_split(prompts_per_step, p.mini_batch_size // p.micro_batch_size, world)
    # This process's contiguous slice of every step's rows (whole prompt groups), and the rows per
    # generation call. A step sampled in one call draws from the run's torch stream; a step split into
    # several calls (over processes, or by generation.batch_size) seeds each call by its first row, so
    # the samples do not depend on the process count wherever generation.batch_size divides the share.
    my_rows = range(rank * share * p.samples_per_prompt, (rank + 1) * share * p.samples_per_prompt)
    rows_per_call = g.batch_size or len(my_rows)
    seeded_calls = rows_per_call < p.rollout_size
    device = acc.device
    torch.manual_seed(cfg.train.seed)

    policy, ref, tok = load_policy_and_reference(cfg, device)
    critic: ValueModel | None = None
    if p.algorithm == "ppo":
        critic = critic_from_reward_model(p.critic_model or cfg.reward.model, device, tok) if p.critic == "reward_model" \
            else policy_value_head(policy)
        # from_pretrained hands its model over in eval mode, and transformers checkpoints a layer's
        # activations (train.gradient_checkpointing) only in training mode; the critic has no dropout
        critic.train()
    reward = build_reward(cfg.reward, device)
    train_prompts = tokenize_prompts(train_records, tok, cfg.data.max_prompt_len)
    eval_prompts = tokenize_prompts(eval_records, tok, cfg.data.max_prompt_len)
    ptx = ptx_batches(cfg.data.ptx, tok, p.ptx_batch_size, cfg.train.seed) if p.ptx_coef > 0 else None
    stop_ids = stop_token_ids(tok, policy.config, policy.generation_config)
    sampler = make_sampler(policy, stop_ids, tok.pad_token_id, g, PARAM_DTYPES.get(acc.mixed_precision, torch.float32))
    # A sampler with numerics of its own (vLLM; generation.precision other than the trainer's) gets the
    # policy's weights after every change, and its log-probs only weight the loss (truncated importance
    # sampling): the trainer's are recomputed.
    engine = sampler if sampler.own_numerics else None
    # The no-grad reference / critic forwards run in micro-batches of rows of similar length (the training's
    # size): on a CPU a small group's activations and logits stay in cache, and short prompts skip the long ones'
    # padding.
    scoring_batch = p.micro_batch_size
    critic_trains_while_scoring = critic is not None and one_critic_update_per_rollout(p, critic)

    # The modules the losses call: DDP-wrapped on several processes, or sharded in place (then `policy` and
    # `critic` are those sharded modules). Generation, the reference's disabled adapter, EMA and checkpoints
    # use `policy`; `critic` keeps its attributes. Wrapped before the optimizer: sharding replaces parameters.
    # Micro-batches of a few short rows: there a CPU bf16 forward's attention trains faster computed in float32
    # (models.attention; bench/README.md). SFT, reward and DPO training keep transformers' SDPA, where it cost
    # peak memory for no measured gain.
    use_training_sdpa(policy)
    if critic is not None:
        use_training_sdpa(critic)
    train_policy = wrap_for_training(acc, policy, tcfg)
    train_critic = None if critic is None else wrap_for_training(acc, critic, tcfg)
    # what checkpoints hold: every trained module, under one name each
    trained = nn.ModuleDict({"policy": policy} if critic is None else {"policy": policy, "critic": critic})
    groups = param_groups(policy.named_parameters(), tcfg.weight_decay)
    if critic is not None:  # one optimizer, so one state file restores both
        groups += param_groups(critic.named_parameters(), tcfg.weight_decay, lr=p.critic_lr or tcfg.lr)
    optimizer = build_optimizer(groups, tcfg)
    updates_per_step = p.ppo_epochs * (p.rollout_size // p.mini_batch_size)
    scheduler = build_scheduler(optimizer, tcfg, p.steps * updates_per_step)
    kl_ctl = pm.KLController(p.kl_coef, p.kl_target, p.kl_horizon)
    ema = {n: t.clone() for n, t in trainable_state(policy).items()} if p.ema_decay else None

    changed = open_run(run, cfg, overwrite, PPO_MUTABLE, acc.is_main_process)
    ckpt = Checkpointer(run.checkpoints, cfg.train.save_total_limit, sharded=tcfg.distributed == "fsdp")
    divergence = DivergenceCheck(ckpt, "PPO", "lower train.lr or raise the KL coefficient")
    samples_log = MetricsLog(run.root / "samples.jsonl", enabled=acc.is_main_process)
    params = count_parameters(policy)
    log.info("policy: %s parameters, %s trainable; %d training prompts, %d held out", f"{params['total']:,}",
             f"{params['trainable']:,}", len(train_prompts), len(eval_prompts))

    def reference_logprobs(r: Rollout) -> torch.Tensor:
        with torch.no_grad(), acc.autocast():
            if ref is not None:
                return score_in_length_groups(r, scoring_batch, lambda m: _logprobs(ref, m, g.temperature),
                                              p.samples_per_prompt)
            with policy.disable_adapter():
                return score_in_length_groups(r, scoring_batch, lambda m: _logprobs(policy, m, g.temperature),
                                              p.samples_per_prompt)

    def held_out_reward() -> float | None:
        """Mean reward of sampled responses to the held-out prompts, with a fixed seed (same draws before
        and after training) and without touching the training RNG stream."""
        if not eval_prompts:
            return None
        with seeded(cfg.train.seed + 1):
            policy.eval()
            with full_parameters(policy):
                r = sampler.generate([q.ids for q in eval_prompts], g)
            score, _ = reward([q.source for q in eval_prompts], decode(tok, r), column_lists(eval_prompts))
        return score.mean().item()

    state = {"step": 0, "epoch": 0, "position": 0, "negative_kl_streak": 0}
    resumed = resume(ckpt, trained, optimizer, scheduler, None if ema is None else {"ema": ema})
    if resumed is not None:
        latest, saved = resumed
        kl_ctl.load_state_dict(saved["kl_controller"])
        # The target and horizon are settings, the coefficient is state (unless the config changed it).
        kl_ctl.target, kl_ctl.horizon = p.kl_target, p.kl_horizon
        if "ppo.kl_coef" in changed:
            kl_ctl.coef = p.kl_coef
        state = saved["loop"]
        if engine is not None:
            engine.load_weights(policy)
        log.info("resuming from %s (step %d of %d)", latest, state["step"], p.steps)
    else:
        with torch.no_grad(), acc.autocast():  # as the final evaluation in finish_run
            state["eval_reward_before"] = held_out_reward()
    samples_log.truncate_after(state["step"])
    optimizer = acc.prepare(optimizer)
    logger = StepLogger(acc, run, p.steps, state["step"] if resumed else None, p.algorithm,
                        cfg.model_dump(mode="json"))

    def checkpoint() -> None:
        ckpt.save(state["step"], trained, optimizer, {"scheduler": scheduler.state_dict(), "loop": state,
                                                       "kl_controller": kl_ctl.state_dict()},
                  None if ema is None else {"ema": ema})

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
        calls = []
        with full_parameters(policy):  # each process generates its own rows, for as long as they take
            for start in range(my_rows.start, my_rows.stop, rows_per_call):
                with seeded(rollout_seed(cfg.train.seed, state["step"], start)) if seeded_calls \
                        else contextlib.nullcontext(), acc.autocast():
                    rows = batch[start: min(start + rows_per_call, my_rows.stop)]
                    calls.append(sampler.generate([q.ids for q in rows], g, keep_logprobs=True))
        # Every process holds the whole step's rollout from here on: the statistics, whitening and
        # minibatches below are those of the global batch, exactly as in one process.
        r = _to(concat_rollouts([c for part in gather_object([calls]) for c in part], tok.pad_token_id), device)
        if engine is not None:
            engine.sleep()
        old_logp = r.logprobs
        t1 = time.perf_counter()

        # ---- score: reward sources, reference log-probs, critic values (each process its own rows)
        mine = r.select(list(my_rows))
        my_batch = batch[my_rows.start: my_rows.stop]
        my_responses = decode(tok, mine)
        my_score, my_source_means = reward([q.source for q in my_batch], my_responses, column_lists(my_batch))
        t_reward = time.perf_counter() - t1
        my_ref_logp = reference_logprobs(mine)
        my_trainer_logp = None
        if engine is not None:
            with torch.no_grad(), acc.autocast():
                my_trainer_logp = score_in_length_groups(
                    mine, scoring_batch, lambda m: _logprobs(policy, m, g.temperature), p.samples_per_prompt)
        my_values = None
        if critic is not None and not critic_trains_while_scoring:
            with torch.no_grad(), acc.autocast():
                my_values = score_in_length_groups(mine, scoring_batch, lambda m: _values(policy, critic, m),
                                                   p.samples_per_prompt)
        parts = gather_object([(my_responses, my_score.cpu(), my_source_means, my_ref_logp.cpu(),
                                None if my_values is None else my_values.cpu(),
                                None if my_trainer_logp is None else my_trainer_logp.cpu())])
        responses = [text for part in parts for text in part[0]]
        score = torch.cat([part[1] for part in parts]).to(device)
        # equal shares, so the mean of the processes' means is the global mean
        source_means = {k: sum(part[2][k] for part in parts) / world for k in my_source_means}
        ref_logp = torch.cat([part[3] for part in parts]).to(device)
        old_values = None if my_values is None else torch.cat([part[4] for part in parts]).to(device)
        divergence.check(score, state["step"] + 1, "the reward")
        t2 = time.perf_counter()

        # ---- rewards and advantages
        mask = r.response_mask.float()
        is_weights, engine_stats = None, {}
        if engine is not None:
            old_logp = torch.cat([part[5] for part in parts]).to(device)
            is_weights, engine_stats = pm.truncated_is_weights(old_logp, r.logprobs, mask, p.rollout_is_cap)
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
        # The same on every process (the RNG streams stay in step). A prompt's samples stay together: a
        # micro-batch runs each of its prompts once (response_logits), and a minibatch of whole groups holds
        # RLOO's and GRPO's group-relative advantages as they were computed.
        first_perm = prompt_group_permutation(len(r), p.samples_per_prompt)
        sums: dict[str, float] = defaultdict(float)
        n_micro = p.mini_batch_size // p.micro_batch_size
        if p.algorithm == "ppo":
            rewards, _ = pm.kl_penalised_rewards(score, old_logp, ref_logp, mask, kl_ctl.coef, p.kl_estimator)
            if critic_trains_while_scoring:
                old_values = critic_update_giving_values(train_critic, r, first_perm, rewards, mask, p, acc,
                                                         world, rank, divergence, state["step"] + 1, sums)
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
        n_updates, stopped_early = 0, False
        head_on_policy = critic is not None and critic.body is None
        # the critic's one update is made (its gradients accumulated) above
        loss_critic = None if critic_trains_while_scoring else train_critic
        for epoch in range(p.ppo_epochs):
            perm = first_perm if epoch == 0 else prompt_group_permutation(len(r), p.samples_per_prompt)
            for start in range(0, len(r), p.mini_batch_size):
                # This process's share of the global minibatch: every world-th micro-batch, its loss scaled
                # so that DDP's average over processes is the minibatch mean (as fit.py's units).
                mb_kl = 0.0
                ptx_start = state.setdefault("ptx_position", 0) if ptx is not None else 0
                for j, m0 in enumerate(range(start, start + p.mini_batch_size, p.micro_batch_size)):
                    if j % world != rank:
                        continue
                    # Random prompts, not rows of similar length: each micro-batch's loss is its own token mean,
                    # so cutting micro-batches by length would weight short responses' tokens above long ones'.
                    idx = perm[m0: m0 + p.micro_batch_size]
                    m = r.select(idx)
                    m_mask = mask[idx]
                    with acc.autocast():
                        loss, stats = micro_batch_loss(train_policy, loss_critic, head_on_policy, m, m_mask,
                                                       old_logp[idx], ref_logp[idx], advantages[idx],
                                                       None if returns is None else returns[idx],
                                                       None if old_values is None else old_values[idx],
                                                       kl_ctl.coef, p, g.temperature,
                                                       None if is_weights is None else is_weights[idx])
                        if ptx is not None:
                            ptx_batch = {k: v.to(device) if torch.is_tensor(v) else v
                                         for k, v in ptx(ptx_start + j).items()}
                            lm_sum, lm_n = causal_lm_loss_sum(train_policy, ptx_batch)
                            loss = loss + p.ptx_coef * lm_sum / max(lm_n, 1)
                            stats["ptx_loss"] = lm_sum.item() / max(lm_n, 1)
                    divergence.check(loss, state["step"] + 1, "the loss")
                    acc.backward(loss / (n_micro / world))
                    for k, v in stats.items():
                        sums[k] += v / n_micro
                    mb_kl += stats["approx_kl"] / n_micro
                if ptx is not None:
                    state["ptx_position"] = ptx_start + n_micro
                mb_kl = sum_over_processes(acc, {"approx_kl": mb_kl})["approx_kl"]  # the early stop is global
                # policy and critic are clipped each to max_grad_norm on its own
                clip = [policy.parameters()] + ([critic.parameters()] if critic is not None else [])
                optimizer_step(acc, optimizer, scheduler, clip, tcfg.max_grad_norm, divergence, state["step"] + 1)
                n_updates += 1
                if p.max_approx_kl is not None and mb_kl > p.max_approx_kl:
                    stopped_early = True
                    break
            if stopped_early:
                break
        sums = sum_over_processes(acc, sums)
        if ema is not None:
            with torch.no_grad():
                for n, param in policy.named_parameters():
                    if n in ema:
                        ema[n].mul_(p.ema_decay).add_(param.detach().cpu(), alpha=1 - p.ema_decay)
        if engine is not None:
            t_sync = time.perf_counter()
            engine.load_weights(policy)
            engine_stats["time_weight_sync"] = time.perf_counter() - t_sync
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
                  "ppo_updates": n_updates, "update_stopped_early": stopped_early, **engine_stats,
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
            logger.log(record)
        if cfg.train.samples_to_log and (state["step"] % cfg.train.sample_steps == 0 or state["step"] == 1):
            for i in range(min(cfg.train.samples_to_log, len(r))):
                samples_log.write({"step": state["step"], "prompt": batch[i].text, "response": responses[i],
                                   "score": raw_score[i].item(), "kl": seq_kl[i].item(),
                                   "ended_with_eos": bool(r.ended[i])})
        logger.advance(score=f"{record['score_mean']:.3f}", kl=f"{mean_kl:.3f}")
        if state["step"] % cfg.train.save_steps == 0 or state["step"] == p.steps:
            checkpoint()
    logger.close()

    # ---- final model and evaluation
    if ema is not None:
        load_trainable_state(policy, {n: t.to(device) for n, t in ema.items()})
        if engine is not None:
            engine.load_weights(policy)

    def final_eval(_final_policy) -> dict:
        return {"algorithm": p.algorithm, "steps": state["step"], "held_out_prompts": len(eval_prompts),
                "reward_before": state["eval_reward_before"], "reward_after": held_out_reward(), "parameters": params}

    def save(final_policy, state_dict: dict | None) -> None:
        save_model(final_policy, tok, run.model_dir, meta={"stage": "ppo", "algorithm": p.algorithm,
                                                           "base_model": cfg.model.name_or_path,
                                                           "adapter": cfg.model.adapter}, state_dict=state_dict)

    return finish_run(acc, run, train_policy, final_eval, save, {"stage": "ppo"})


# ---------------------------------------------------------------- helpers


def decode(tok, r: Rollout) -> list[str]:
    return [tok.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(r.response_ids, r.response_mask, strict=True)]


def check_process_split(prompts_per_step: int, micro_per_minibatch: int, world: int) -> int:
    """Prompts per process per step; the step's prompts and every minibatch's micro-batches must split
    evenly over the processes so that each optimizer step sees the same global minibatch as one process."""
    if prompts_per_step % world or micro_per_minibatch % world:
        raise UserError(f"{world} processes need ppo.rollout_size / ppo.samples_per_prompt ({prompts_per_step} "
                        f"prompts a step) and ppo.mini_batch_size / ppo.micro_batch_size ({micro_per_minibatch} "
                        f"micro-batches a minibatch) to be multiples of {world}")
    return prompts_per_step // world


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts of separate generation calls as one: prompts left-padded, responses right-padded to the
    widest (padding is masked, so every row's tokens and log-probabilities are kept as they are)."""
    if len(parts) == 1:
        return parts[0]
    prompt_width = max(r.prompt_ids.shape[1] for r in parts)
    response_width = max(r.response_ids.shape[1] for r in parts)

    def left(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (prompt_width - t.shape[1], 0), value=value)

    def right(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, response_width - t.shape[1]), value=value)

    has_logprobs = parts[0].logprobs is not None
    return Rollout(torch.cat([left(r.prompt_ids, pad_id) for r in parts]),
                   torch.cat([left(r.prompt_mask, 0) for r in parts]),
                   torch.cat([right(r.response_ids, pad_id) for r in parts]),
                   torch.cat([right(r.response_mask, 0) for r in parts]),
                   torch.cat([r.ended for r in parts]),
                   torch.cat([right(r.logprobs, 0.0) for r in parts]) if has_logprobs else None)


def sum_over_processes(acc, sums: dict[str, float]) -> dict[str, float]:
    """Each statistic summed over the processes (the same keys on each); unchanged in one process."""
    if acc.num_processes == 1 or not sums:
        return dict(sums)
    keys = sorted(sums)
    total = acc.reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=acc.device), "sum")
    return dict(zip(keys, total.tolist(), strict=True))


def _to(r: Rollout, device: torch.device) -> Rollout:
    return Rollout(*(t if t is None else t.to(device) for t in (r.prompt_ids, r.prompt_mask, r.response_ids,
                                                                 r.response_mask, r.ended, r.logprobs)))


def score_in_length_groups(r: Rollout, size: int, fn, rows_per_prompt: int = 1) -> torch.Tensor:
    """Run fn over micro-batches of about ``size`` rows of similar length (each without the prompt padding none
    of its rows needs), each prompt's ``rows_per_prompt`` contiguous samples in one micro-batch (so that its
    forward runs the prompt once: response_logits), and put the [b, R] results back in the rollout's row order,
    [B, R]."""
    k = rows_per_prompt if len(r) % rows_per_prompt == 0 else 1
    lengths = r.lengths()
    longest_sample = [max(lengths[i: i + k]) for i in range(0, len(r), k)]
    groups = [[g * k + j for g in batch for j in range(k)]
              for batch in length_batches(longest_sample, max(1, size // k))]
    parts = [fn(r.select(idx)) for idx in groups]
    out = parts[0].new_zeros((len(r), *parts[0].shape[1:]))
    for idx, part in zip(groups, parts, strict=True):
        out[idx] = part
    return out


def prompt_group_permutation(rows: int, rows_per_prompt: int) -> torch.Tensor:
    """A random order of ``rows`` rows that keeps each prompt's ``rows_per_prompt`` contiguous samples together
    (for one sample per prompt: torch.randperm(rows))."""
    k = rows_per_prompt
    return (torch.randperm(rows // k)[:, None] * k + torch.arange(k)).flatten()


def response_logits_and_hidden(policy: nn.Module, r: Rollout,
                               want_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits [N, V] at response tokens only, and (for a value head on the policy) the hidden states."""
    if not want_hidden:
        return response_logits(policy, r), None
    if is_parallel_wrapped(policy):
        # DDP averages gradients (FSDP gathers parameters) only in its own forward, so the body must not run
        # apart; the last hidden states are the body's output, as in the split path.
        x = sequence_inputs(r)
        out = policy(input_ids=x["input_ids"], attention_mask=x["attention_mask"], position_ids=x["position_ids"],
                     use_cache=False, output_hidden_states=True)
        select = x["select"]
        return out.logits[:, :-1][select], out.hidden_states[-1][:, :-1][select]
    parts = body_and_lm_head(policy)
    if parts is None:
        raise UserError("ppo.critic=policy_head is not supported for this model; use ppo.critic=reward_model")
    body, head = parts
    hidden = response_hidden(body, r)
    return head(hidden), hidden


def _logprobs(model: nn.Module, r: Rollout, temperature: float) -> torch.Tensor:
    logits, _ = response_logits_and_hidden(model, r, False)
    ids = r.response_ids[r.response_mask.bool()]
    return scatter_response(token_logprobs(logits, ids, temperature), r.response_mask)


def _values(policy: nn.Module, critic: ValueModel, r: Rollout) -> torch.Tensor:
    if critic.body is not None:
        return critic(r)
    _, hidden = response_logits_and_hidden(policy, r, True)
    return critic(r, hidden)


def one_critic_update_per_rollout(p, critic: ValueModel) -> bool:
    """One PPO epoch over one minibatch, and a critic with a body of its own: then the critic's only update
    of a step reads the very values its no-grad scoring of the rollout would give (its weights have not
    moved yet), so one forward with gradients serves both (critic_update_giving_values)."""
    return critic.body is not None and p.ppo_epochs == 1 and p.mini_batch_size == p.rollout_size


def critic_update_giving_values(critic: nn.Module, r: Rollout, perm: torch.Tensor, rewards: torch.Tensor,
                                mask: torch.Tensor, p, acc, world: int, rank: int, divergence: DivergenceCheck,
                                step: int, sums: dict[str, float]) -> torch.Tensor:
    """A separate critic's one update of a step with one PPO epoch over one minibatch, run on the step's
    micro-batches (``perm``, this process's share) before the policy's: each forward with gradients gives
    the values the rollout's no-grad scoring would have given, so they serve as the old values, the
    micro-batch's returns come from them by GAE (which runs within each response) and its value loss is
    backpropagated at once (the optimizer steps with the policy's). Returns the old values [B, R] of every
    row, gathered from every process; the value-loss statistics are added to ``sums`` as the policy's are."""
    n_micro = p.mini_batch_size // p.micro_batch_size
    mine, my_values = [], []
    for j, m0 in enumerate(range(0, p.mini_batch_size, p.micro_batch_size)):
        if j % world != rank:
            continue
        idx = perm[m0: m0 + p.micro_batch_size]
        m_mask = mask[idx]
        with acc.autocast():
            values = critic(r.select(idx))
            old_values = values.detach()
            _, returns = pm.gae(rewards[idx], old_values, m_mask, p.gamma, p.lam)
            vloss, vst = pm.value_loss(values, old_values, returns, m_mask, p.value_clip_range)
            loss = p.vf_coef * vloss
        divergence.check(loss, step, "the critic's loss")
        acc.backward(loss / (n_micro / world))
        sums["value_loss"] += vloss.item() / n_micro
        sums["vf_clip_frac"] += vst["vf_clip_frac"].item() / n_micro
        mine.append(idx)
        my_values.append(old_values.cpu())
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for idx, values in (pair for part in gather_object([list(zip(mine, my_values, strict=True))]) for pair in part):
        out[idx] = values
    return out.to(mask.device)


def micro_batch_loss(policy, critic, head_on_policy: bool, m: Rollout, mask, old_logp, ref_logp, advantages,
                     returns, old_values, kl_coef, p, temperature,
                     is_weights=None) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch's PPO loss: the clipped policy loss (each token weighted by ``is_weights``, the
    rollout engine's importance correction, when given), minus the entropy bonus, plus GRPO's k3 KL
    term and the critic's clipped value loss; with the logged statistics of each part. ``policy`` and
    ``critic`` are the prepared (on several processes DDP-wrapped) modules; ``head_on_policy``: the critic
    is a value head on the policy's hidden states."""
    logits, hidden = response_logits_and_hidden(policy, m, head_on_policy)
    ids = m.response_ids[m.response_mask.bool()]
    # one pass over the vocabulary gives the sampled tokens' log-probs and the entropy (a loss term only with
    # entropy_coef; its backward costs nothing where it is not)
    token_logp, token_entropy = token_logprobs_and_entropy(logits, ids, temperature)
    logp = scatter_response(token_logp, m.response_mask)
    loss, st = pm.policy_loss(logp, old_logp, advantages, mask, p.clip_range, is_weights)
    entropy = token_entropy.mean()
    stats = {"policy_loss": loss.item(), "clip_frac": st["clip_frac"].item(), "approx_kl": st["approx_kl"].item(),
             "entropy": entropy.item()}
    if p.entropy_coef:
        loss = loss - p.entropy_coef * entropy
    if p.algorithm == "grpo" and kl_coef:
        kl_term = pm.masked_mean(pm.kl_estimate(logp, ref_logp, "k3"), mask)
        loss = loss + kl_coef * kl_term
    if critic is not None:
        values = critic(m, hidden) if head_on_policy else critic(m)
        vloss, vst = pm.value_loss(values, old_values, returns, mask, p.value_clip_range)
        loss = loss + p.vf_coef * vloss
        stats.update(value_loss=vloss.item(), vf_clip_frac=vst["vf_clip_frac"].item())
    return loss, stats
