"""``alignloop sweep``: hyperparameter search over an SFT config with Optuna.

Each trial is an ordinary SFT run in ``<sweep>/trial-NNN`` with some config keys replaced by
sampled values. The study lives in ``<sweep>/study.db`` (SQLite), so rerunning the same command
after an interruption keeps every finished trial and only runs the ones still missing; a trial
that was cut off mid-run is retried with the same values. Trials report their validation metric
after every evaluation and the median pruner stops those clearly behind. At the end the best
values are written into ``<sweep>/best.yaml``, a config ready for ``alignloop sft -c``.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Literal

import optuna
from pydantic import ValidationError, model_validator

from alignloop.config import SFTConfig, Strict, describe_validation_error, dump_config, read_yaml, set_dotted
from alignloop.errors import TrainingDiverged, UserError
from alignloop.train.supervised import run_supervised
from alignloop.training.fit import metric_greater_is_better

log = logging.getLogger(__name__)


class Param(Strict):
    """One searched key: a float or int range (optionally log-scaled) or a list of choices."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _complete(self) -> Param:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty 'choices' list")
        elif self.low is None or self.high is None or self.low > self.high:
            raise ValueError("a float/int parameter needs 'low' <= 'high'")
        elif self.log and self.low <= 0:
            raise ValueError("a log-scaled parameter needs 'low' > 0")
        return self


def default_space(cfg: SFTConfig) -> dict[str, Param]:
    """Learning rate, batch size, epochs, weight decay and warm-up for every task; LoRA rank when the
    config trains an adapter. Heads on a pretrained encoder take larger learning rates than a whole
    causal LM does."""
    lr = (1e-5, 3e-4) if cfg.task == "causal_lm" else (1e-5, 5e-4)
    if cfg.model.adapter != "none":
        lr = (5e-5, 1e-3)
    space = {
        "train.lr": Param(type="float", low=lr[0], high=lr[1], log=True),
        "train.batch_size": Param(type="categorical", choices=[8, 16, 32]),
        "train.epochs": Param(type="int", low=1, high=4),
        "train.weight_decay": Param(type="float", low=0.0, high=0.1),
        "train.warmup_ratio": Param(type="float", low=0.0, high=0.2),
    }
    if cfg.model.adapter != "none":
        space["model.lora.r"] = Param(type="categorical", choices=[4, 8, 16, 32])
    return space


def read_space(path: str | Path) -> dict[str, Param]:
    tree = read_yaml(path)
    space = {}
    for key, spec in tree.items():
        try:
            space[str(key)] = Param.model_validate(spec)
        except ValidationError as exc:
            raise UserError(describe_validation_error(exc, f"{path}: {key}")) from None
    if not space:
        raise UserError(f"{path}: the search space is empty")
    return space


def suggest(trial, key: str, p: Param) -> Any:
    if p.type == "categorical":
        return trial.suggest_categorical(key, p.choices)
    if p.type == "int":
        return trial.suggest_int(key, int(p.low), int(p.high), log=p.log)
    return trial.suggest_float(key, p.low, p.high, log=p.log)


def trial_config(base: dict, values: dict[str, Any], output_dir: Path, source: str) -> SFTConfig:
    tree = copy.deepcopy(base)
    for key, value in values.items():
        set_dotted(tree, key.split("."), value)
    tree["output_dir"] = str(output_dir)
    try:
        return SFTConfig.model_validate(tree)
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc, source)) from None


def validation_value(run_dir: Path, metric: str) -> float:
    """The metric of the final (best) model on the validation split, from the run's eval.json."""
    validation = json.loads((run_dir / "eval.json").read_text()).get("validation") or {}
    for key in (metric, metric.removeprefix("eval_")):
        if key in validation:
            return float(validation[key])
    raise UserError(f"train.metric: {metric!r} is not in {run_dir / 'eval.json'} (is there validation data?)")


def run_sweep(cfg: SFTConfig, trials: int, space: dict[str, Param], sweep_dir: Path) -> tuple[Any, Path]:
    base = cfg.model_dump(mode="json")
    for key, p in space.items():  # every key must exist in the config: fail now, not in trial 7
        sample = p.choices[0] if p.type == "categorical" else (int(p.low) if p.type == "int" else p.low)
        trial_config(base, {key: sample}, sweep_dir / "check", f"search space key '{key}'")

    sweep_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = json.dumps({"config": base, "space": {k: p.model_dump() for k, p in space.items()}},
                             sort_keys=True)
    direction = "maximize" if metric_greater_is_better(cfg.train) else "minimize"
    study = optuna.create_study(
        study_name="alignloop", storage=f"sqlite:///{sweep_dir / 'study.db'}", load_if_exists=True,
        direction=direction, sampler=optuna.samplers.TPESampler(seed=cfg.train.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
    stored = study.user_attrs.get("fingerprint")
    if stored is None:
        study.set_user_attr("fingerprint", fingerprint)
    elif stored != fingerprint:
        raise UserError(f"{sweep_dir} holds a sweep of a different config or search space; "
                        "choose another --output or delete that folder")

    # A trial still RUNNING in the database was cut off (crash, Ctrl-C, SIGKILL): retry its values.
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        log.info("trial %d was interrupted; retrying its values", t.number)
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params)

    metric = cfg.train.metric

    def objective(trial) -> float:
        values = {key: suggest(trial, key, p) for key, p in space.items()}
        run_dir = sweep_dir / f"trial-{trial.number:03d}"
        trial_cfg = trial_config(base, values, run_dir, f"trial {trial.number}")
        evals = 0

        def on_eval(step: int, metrics: dict[str, float]) -> None:
            nonlocal evals
            if step == 0 or metric not in metrics:  # the untrained model says nothing about these values
                return
            evals += 1
            trial.report(metrics[metric], evals)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{metric}={metrics[metric]:.4g} after evaluation {evals}")

        try:
            run_supervised(trial_cfg, overwrite=True, on_eval=on_eval)
        except TrainingDiverged as exc:  # these values are bad, the sweep is not
            raise optuna.TrialPruned(str(exc)) from None
        return validation_value(run_dir, metric)

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    if done < trials:
        log.info("sweep %s: %d trials done, running %d more", sweep_dir, done, trials - done)
        study.optimize(objective, n_trials=trials - done, catch=())
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise UserError(f"{sweep_dir}: no trial completed (all were pruned or failed); widen the search space")

    best = study.best_trial
    best_cfg = trial_config(base, best.params, sweep_dir / "best", "best trial")
    dump_config(best_cfg, sweep_dir / "best.yaml")
    return study, sweep_dir / "best.yaml"


def trials_table(study, metric: str) -> str:
    keys = sorted({k for t in study.trials for k in t.params})
    header = ["trial", "state", metric, *keys, "seconds"]
    rows = [header]
    for t in study.trials:
        seconds = f"{t.duration.total_seconds():.0f}" if t.duration else "-"
        rows.append([str(t.number), t.state.name.lower(), f"{t.value:.4f}" if t.value is not None else "-",
                     *[_fmt(t.params.get(k)) for k in keys], seconds])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if isinstance(v, float) else str(v)
