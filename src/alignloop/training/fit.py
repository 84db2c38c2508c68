"""The supervised loop (SFT, classification, tagging, reward models), built from the training parts.

A stage supplies its items, a collate function and a loss function; ``fit`` does the rest:
seeded and resumable batch order (optionally grouped by length), gradient accumulation with
token-exact loss normalisation across micro-batches and processes, clipping, schedules, mixed
precision, evaluation, early stopping, best checkpoint, exact resume, metrics and progress.

Loss functions return a *sum* over their units (tokens, pairs, examples) and the unit count,
so an optimizer step averages over every unit in it however it is split into micro-batches or
processes: two processes train to the same weights as one process accumulating twice as long.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from alignloop.config import TrainConfig
from alignloop.errors import UserError
from alignloop.runs import RunDir
from alignloop.training.accelerator import make_accelerator
from alignloop.training.batch_order import epoch_batches
from alignloop.training.checkpoint import Checkpointer
from alignloop.training.distributed import wrap_for_training
from alignloop.training.divergence import DivergenceCheck
from alignloop.training.logger import StepLogger
from alignloop.training.optim import build_optimizer, build_scheduler, optimizer_step, param_groups
from alignloop.training.resume import resume

log = logging.getLogger(__name__)

# (model, batch) -> (loss summed over units, number of units, extra metric sums over units)
LossFn = Callable[[nn.Module, dict], tuple[torch.Tensor, int, dict[str, float]]]
EvalFn = Callable[[nn.Module], dict[str, float]]


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0  # global micro-batch position inside the epoch
    units_seen: int = 0  # only recorded; resume rebuilds TrainState(**saved), so checkpoints need the field
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    extra: dict = field(default_factory=dict)


@dataclass
class FitResult:
    state: TrainState
    last_eval: dict[str, float]
    best: dict | None


def metric_greater_is_better(cfg: TrainConfig) -> bool:
    if cfg.greater_is_better is not None:
        return cfg.greater_is_better
    return not any(k in cfg.metric for k in ("loss", "error", "perplexity", "ece"))


def fit(
    model: nn.Module,
    items: Sequence[Any],
    collate: Callable[[list[Any]], dict],
    loss_fn: LossFn,
    cfg: TrainConfig,
    run: RunDir,
    evaluate: EvalFn | None = None,
    lengths: Sequence[int] | None = None,
    accelerator=None,
    tracker_config: dict | None = None,
    description: str = "train",
    on_eval: Callable[[int, dict[str, float]], None] | None = None,
    on_step: Callable[[TrainState], None] | None = None,
) -> FitResult:
    """Train ``model`` in place. Resumes from ``run``'s latest checkpoint when there is one.

    ``on_eval(step, metrics)`` is called after every evaluation; it may raise to stop training
    (a hyperparameter sweep prunes a hopeless trial this way)."""
    acc = accelerator or make_accelerator(cfg, run)
    world, rank, main = acc.num_processes, acc.process_index, acc.is_main_process
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    group = cfg.grad_accum * world  # micro-batches per optimizer step, all processes together
    batches_per_epoch = len(epoch_batches(len(items), cfg.batch_size, cfg.seed, 0))
    steps_per_epoch = batches_per_epoch // group
    if steps_per_epoch == 0:
        raise UserError(f"too little training data: {len(items)} items make {batches_per_epoch} batches of "
                        f"{cfg.batch_size}, fewer than one optimizer step needs ({group}); lower train.batch_size "
                        "or train.grad_accum")
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    eval_every = cfg.eval_steps or steps_per_epoch
    save_every = cfg.save_steps or eval_every

    # Wrapped (DDP, or sharded in place) before the optimizer is built: sharding replaces the parameters.
    model = wrap_for_training(acc, model, cfg)
    optimizer = build_optimizer(param_groups(model.named_parameters(), cfg.weight_decay), cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    run.root.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(run.checkpoints, cfg.save_total_limit, sharded=cfg.distributed == "fsdp")
    divergence = DivergenceCheck(ckpt, "training", "lower train.lr or check the data")

    state = TrainState()
    window = _new_window()
    resumed = resume(ckpt, acc.unwrap_model(model), optimizer, scheduler)
    if resumed is not None:
        latest, saved = resumed
        state = TrainState(**saved["train_state"])
        window.update(state.extra.get("window", {}))
        if main:
            log.info("resuming from %s (step %d of %d)", latest, state.step, total_steps)
    optimizer = acc.prepare(optimizer)
    logger = StepLogger(acc, run, total_steps, state.step if resumed else None, description, tracker_config)

    greater = metric_greater_is_better(cfg)
    last_eval: dict[str, float] = {}
    start_value: float | None = None  # the metric before any training step

    def run_eval() -> dict[str, float]:
        model.eval()
        with torch.no_grad(), acc.autocast():
            result = evaluate(acc.unwrap_model(model)) if evaluate else {}
        model.train()
        return result

    def checkpoint() -> None:
        state.extra["window"] = {k: window[k] for k in ("loss", "units", "extras")}
        ckpt.save(state.step, acc.unwrap_model(model), optimizer,
                  {"scheduler": scheduler.state_dict(), "train_state": asdict(state)})

    def after_eval(result: dict[str, float]) -> None:
        nonlocal last_eval, start_value
        last_eval = result
        logger.log({"step": state.step, "epoch": round(state.step / steps_per_epoch, 4), **result})
        if on_eval is not None:
            on_eval(state.step, result)
        value = result.get(cfg.metric)
        if value is None or not math.isfinite(value):
            return
        if state.step == 0:
            # The untrained model is the curve's baseline, never the "best checkpoint": on a small validation
            # set it can win by noise (a reward model at 0.67 validation accuracy before training scored 0.36
            # on its test pairs), and a training run that silently returns its starting weights surprises.
            start_value = value
            return
        better = state.best_metric is None or (value > state.best_metric if greater else value < state.best_metric)
        if better:
            state.best_metric, state.best_step, state.evals_without_improvement = value, state.step, 0
            ckpt.save_best(acc.unwrap_model(model), {"step": state.step, cfg.metric: value})
        else:
            state.evals_without_improvement += 1
            if cfg.early_stopping_patience and state.evals_without_improvement >= cfg.early_stopping_patience:
                state.stopped_early = True

    if state.step == 0 and evaluate is not None and resumed is None:
        after_eval(run_eval())

    model.train()
    while state.step < total_steps and not state.stopped_early:
        plan = epoch_batches(len(items), cfg.batch_size, cfg.seed, state.epoch, lengths)
        plan = plan[: steps_per_epoch * group]
        if state.micro_in_epoch >= len(plan):
            state.epoch, state.micro_in_epoch = state.epoch + 1, 0
            continue
        step_batches = plan[state.micro_in_epoch : state.micro_in_epoch + group]
        mine = micro_batches([[items[i] for i in b] for j, b in enumerate(step_batches) if j % world == rank],
                             collate, cfg.micro_batch_tokens, world, acc.device)
        units = torch.tensor(float(sum(b["loss_units"] for b in mine)), device=acc.device)
        if world > 1:
            units = acc.reduce(units, reduction="sum")
        total_units = max(units.item(), 1.0)

        step_loss, step_extras = 0.0, {}
        for k, batch in enumerate(mine):
            batch = {key: v.to(acc.device) if torch.is_tensor(v) else v for key, v in batch.items()}
            sync = k == len(mine) - 1
            ctx = acc.no_sync(model) if not sync and world > 1 else contextlib.nullcontext()
            with ctx:
                with acc.autocast():
                    loss_sum, _, extras = loss_fn(model, batch)
                divergence.check(loss_sum, state.step + 1, "the loss")
                # DDP averages gradients over processes; scale so the step averages over units.
                acc.backward(loss_sum * (world / total_units))
            step_loss += loss_sum.item()
            for key, v in extras.items():
                step_extras[key] = step_extras.get(key, 0.0) + float(v)
            window["tokens"] += batch.get("tokens", 0)
        grad_norm = optimizer_step(acc, optimizer, scheduler, [model.parameters()], cfg.max_grad_norm, divergence,
                                   state.step + 1)[0]

        state.step += 1
        state.micro_in_epoch += group
        if on_step is not None:  # e.g. benchmarks timestamp the end of every optimizer step
            on_step(state)
        my_units = sum(b["loss_units"] for b in mine)
        if world > 1:  # log the loss of the whole step, not just this process's share
            totals = acc.reduce(torch.tensor([step_loss, *step_extras.values()], device=acc.device), "sum")
            step_loss, my_units = totals[0].item(), int(total_units)
            step_extras = dict(zip(step_extras, totals[1:].tolist(), strict=True))
        state.units_seen += int(total_units)
        window["loss"] += step_loss
        window["units"] += my_units
        for key, v in step_extras.items():
            window["extras"][key] = window["extras"].get(key, 0.0) + v
        if cfg.max_grad_norm and grad_norm is not None:  # unclipped runs log no norm
            window["grad_norm"] = grad_norm

        postfix = {}
        if state.step % cfg.log_steps == 0 or state.step == total_steps:
            elapsed = time.perf_counter() - window["t0"]
            record = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 4),
                      "loss": window["loss"] / max(window["units"], 1),
                      "lr": scheduler.get_last_lr()[0]}
            for key, v in window["extras"].items():
                record[key] = v / max(window["units"], 1)
            if "grad_norm" in window:
                record["grad_norm"] = window["grad_norm"]
            record["tokens_per_sec"] = round(window["tokens"] * world / elapsed, 1) if elapsed > 0 else None
            logger.log(record)
            postfix = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}",
                       "tok_s": record["tokens_per_sec"]}
            window = _new_window()
        logger.advance(**postfix)

        evaluated = False
        if evaluate is not None and (state.step % eval_every == 0 or state.step == total_steps):
            after_eval(run_eval())
            evaluated = True
        if state.step % save_every == 0 or state.step == total_steps or evaluated or state.stopped_early:
            checkpoint()
    logger.close()

    best_value = state.best_metric
    if main and start_value is not None and best_value is not None and \
            (start_value > best_value if greater else start_value < best_value):
        log.warning("the model before training had a better %s (%.4g) than any checkpoint (best %.4g at step %s); "
                    "check the learning rate and the validation set's size", cfg.metric, start_value, best_value,
                    state.best_step)
    best = None
    if cfg.load_best_at_end and state.best_step is not None and state.best_step != state.step:
        best = ckpt.load_best(acc.unwrap_model(model))
        if best and main:
            log.info("loaded the best checkpoint (step %s, %s=%s)", best["step"], cfg.metric, best.get(cfg.metric))
    acc.wait_for_everyone()
    return FitResult(state=state, last_eval=last_eval, best=best)


def micro_batches(batches: list[list[Any]], collate: Callable[[list[Any]], dict], token_budget: int | None,
                  world: int = 1, device: torch.device | str = "cpu") -> list[dict]:
    """Collated micro-batches of this process's batches, each batch cut into contiguous runs of its items
    whose padded size (``input_ids.numel()``) comes to about ``token_budget`` (None: one micro-batch a
    batch). Grouped batches hold their items longest first, so a run's rows are near one length.

    Cutting changes neither the loss nor the step, which average over every unit of the step, only how
    much the forward and backward hold at once. With several processes every batch is cut into the same
    number of runs on all of them (the most any needs, at most the fewest items any batch holds):
    DDP and FSDP run collectives in every forward and backward, so they must run as many."""
    collated = [collate(b) for b in batches]
    if token_budget is None:
        return collated
    cuts = [min(len(b), math.ceil(c["input_ids"].numel() / token_budget)) for b, c in zip(batches, collated, strict=True)]
    if world > 1:
        # one collective: the most cuts any batch needs and (negated) the fewest items any batch holds
        agreed = torch.tensor([max(cuts), -min(len(b) for b in batches)], device=device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
        cuts = [min(int(agreed[0]), -int(agreed[1]))] * len(batches)
    out: list[dict] = []
    for b, c, k in zip(batches, collated, cuts, strict=True):
        if k <= 1:
            out.append(c)
            continue
        bounds = [round(i * len(b) / k) for i in range(k + 1)]
        out.extend(collate(b[lo:hi]) for lo, hi in zip(bounds, bounds[1:], strict=False))
    return out


def _new_window() -> dict:
    return {"loss": 0.0, "units": 0, "tokens": 0, "t0": time.perf_counter(), "extras": {}}
