"""Trainer-core mechanics on a tiny regression model: NaN stop, early stopping, best checkpoint, schedules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alignloop.config import TrainConfig
from alignloop.errors import TrainingDiverged
from alignloop.runs import RunDir, read_metrics
from alignloop.training.batch_order import epoch_batches
from alignloop.training.checkpoint import Checkpointer
from alignloop.training.fit import fit
from alignloop.training.optim import build_optimizer, build_scheduler, param_groups

torch.manual_seed(0)
X = torch.randn(64, 4)
Y = X @ torch.tensor([1.0, -2.0, 0.5, 3.0])
ITEMS = list(range(64))


def collate(idx: list[int]) -> dict:
    return {"x": X[idx], "y": Y[idx], "loss_units": len(idx)}


def mse_sum(model, batch):
    pred = model(batch["x"]).squeeze(-1)
    return ((pred - batch["y"]) ** 2).sum(), len(batch["y"]), {}


def cfg(**kw) -> TrainConfig:
    base = dict(lr=0.05, batch_size=8, epochs=4, log_steps=1, report_to=[], max_grad_norm=None, schedule="constant")
    base.update(kw)
    return TrainConfig(**base)


def val_loss(model) -> dict:
    device = next(model.parameters()).device  # fit moves the model to the accelerator's device
    return {"eval_loss": float(((model(X.to(device)).squeeze(-1) - Y.to(device)) ** 2).mean())}


def test_nan_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss, n, extra = mse_sum(model, batch)
        return (loss * float("nan") if calls["n"] == 5 else loss), n, extra

    run = RunDir(tmp_path / "run")
    model = nn.Linear(4, 1)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 5: the loss is nan.*step-0000004"):
        fit(model, ITEMS, collate, poisoned, cfg(save_steps=2), run)
    latest = Checkpointer(run.checkpoints).latest()
    assert latest is not None and latest.name == "step-0000004"
    state = Checkpointer(run.checkpoints).load(latest, nn.Linear(4, 1), None)
    assert state["train_state"]["step"] == 4


def test_loss_goes_down_and_best_checkpoint_is_restored(tmp_path):
    run = RunDir(tmp_path / "run")
    model = nn.Linear(4, 1)
    result = fit(model, ITEMS, collate, mse_sum, cfg(eval_steps=4, epochs=10, lr=0.1), run, evaluate=val_loss)
    curve = [m["eval_loss"] for m in read_metrics(run.metrics_path) if "eval_loss" in m]
    assert curve[-1] < 0.2 * curve[0]
    assert result.state.best_metric == pytest.approx(min(curve))
    assert val_loss(model)["eval_loss"] == pytest.approx(min(curve), rel=1e-5)


def test_early_stopping_after_patience_evaluations_without_improvement(tmp_path):
    run = RunDir(tmp_path / "run")
    flat = iter([5.0, 4.0, 4.5, 4.6, 4.7, 1.0, 1.0, 1.0])  # best at the 2nd eval, then 3 worse ones
    result = fit(nn.Linear(4, 1), ITEMS, collate, mse_sum, cfg(eval_steps=2, early_stopping_patience=3), run,
                 evaluate=lambda m: {"eval_loss": next(flat)})
    assert result.state.stopped_early
    assert result.state.step == 8  # evals at steps 0, 2, 4, 6, 8 -> stop after the third worse one
    assert result.state.best_step == 2


def test_the_untrained_model_is_never_the_best_checkpoint(tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    # A small validation set can favour the starting weights by noise; the run must still return a trained model.
    scores = iter([0.9, 0.6, 0.7, 0.65, 0.62])  # evals at steps 0, 2, 4, 6, 8
    model = nn.Linear(4, 1)
    start = model.weight.detach().clone()
    with caplog.at_level("WARNING", logger="alignloop.training.fit"):
        result = fit(model, ITEMS, collate, mse_sum, cfg(eval_steps=2, epochs=1, metric="eval_accuracy"), run,
                     evaluate=lambda m: {"eval_accuracy": next(scores)})
    assert result.state.best_step == 4 and result.state.best_metric == 0.7
    assert result.best is not None and result.best["step"] == 4  # restored from the step-4 checkpoint
    assert not torch.equal(model.weight, start)
    assert "before training had a better eval_accuracy (0.9)" in caplog.text


def test_optimizer_state_exists_before_the_first_step_and_trains_exactly_as_lazy_adamw():
    torch.manual_seed(0)
    start = [torch.randn(6, 4), torch.randn(6)]
    ours_params = [nn.Parameter(t.clone()) for t in start]
    lazy_params = [nn.Parameter(t.clone()) for t in start]
    train = cfg(lr=0.1, weight_decay=0.1)
    ours = build_optimizer(param_groups([("w", ours_params[0]), ("b", ours_params[1])], train.weight_decay), train)
    lazy = torch.optim.AdamW(param_groups([("w", lazy_params[0]), ("b", lazy_params[1])], train.weight_decay),
                             lr=train.lr, betas=train.adam_betas, eps=train.adam_eps, foreach=True)
    # allocated up front, as the first step would leave it before its update; no weight moved, no gradient left
    for p, t in zip(ours_params, start, strict=True):
        state = ours.state[p]
        assert state["step"].item() == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
        assert torch.equal(p, t) and p.grad is None
    assert [g["lr"] for g in ours.param_groups] == [0.1, 0.1]
    for _ in range(3):
        grads = [torch.randn_like(t) for t in start]
        for params, opt in ((ours_params, ours), (lazy_params, lazy)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(ours_params, lazy_params, strict=True):
        assert torch.equal(a, b)
        assert all(torch.equal(ours.state[a][k], lazy.state[b][k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_schedules_warm_up_and_decay():
    opt = build_optimizer(param_groups([("w", nn.Parameter(torch.zeros(2, 2)))], 0.0), cfg(lr=1.0))
    lin = build_scheduler(opt, cfg(lr=1.0, schedule="linear", warmup_steps=2), total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(lin.get_last_lr()[0])
        opt.step()
        lin.step()
    assert lrs[:3] == [0.0, 0.5, 1.0] and lrs[-1] == pytest.approx(0.125)
    opt2 = build_optimizer(param_groups([("w", nn.Parameter(torch.zeros(2, 2)))], 0.0), cfg(lr=1.0))
    cos = build_scheduler(opt2, cfg(lr=1.0, schedule="cosine", warmup_ratio=0.1), total_steps=10)
    seen = []
    for _ in range(10):
        opt2.step()
        cos.step()
        seen.append(cos.get_last_lr()[0])
    assert seen[0] == 1.0 and seen[4] < 1.0 and seen[-1] == pytest.approx(0.0, abs=1e-9)


def test_batch_order_is_a_pure_function_of_seed_and_epoch_and_groups_lengths():
    lengths = [i % 50 for i in range(400)]
    a = epoch_batches(400, 8, seed=1, epoch=0, lengths=lengths)
    assert a == epoch_batches(400, 8, seed=1, epoch=0, lengths=lengths)
    assert a != epoch_batches(400, 8, seed=1, epoch=1, lengths=lengths)
    assert sorted(i for b in a for i in b) == list(range(400))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) / len(a)
    assert spread < 5  # similar lengths share a batch: little padding
