"""Standard benchmarks through lm-evaluation-harness, on a model already in memory.

lm-eval's ``HFLM`` wraps the model and tokenizer the evaluation stage has loaded (no second copy),
``simple_evaluate`` runs the named tasks, and the result is reduced to plain numbers for eval.json:

    {task: {"samples": 50, "version": 1.0, "metrics": {"acc": {"value": 0.62, "stderr": 0.07}, ...}}}

A metric computed after one of the task's filters keeps lm-eval's own name for it, "metric,filter"
(e.g. "exact_match,first-number"); the filter "none" is left out ("acc").

Tasks are lm-eval task YAMLs in a local folder (examples/benchmarks ships two, built from the demo
world), since the hub is out of reach; lm-eval's built-in tasks are offered too, for data already in
the local datasets cache. While lm-eval runs the hub is switched off, so a task that names a hub data
set fails at once instead of waiting on the network.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import datasets
import huggingface_hub

from alignloop.errors import UserError

INSTALL_HINT = "pip install 'alignloop[benchmarks]' (or pip install lm-eval)"


def lm_eval_version() -> str:
    """The installed lm-evaluation-harness version; a UserError naming the pip command when it is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(f"benchmarks need lm-evaluation-harness, which is not installed: {INSTALL_HINT}")
    return importlib.metadata.version("lm_eval")


@contextmanager
def offline_harness() -> Iterator[None]:
    """No hub access and no chatter while lm-eval runs. huggingface_hub and datasets read HF_HUB_OFFLINE /
    HF_DATASETS_OFFLINE once, when they are first imported (transformers has long done that by now), so
    their module flags are switched as well as the environment; all of it is restored afterwards."""
    with (mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}),
          mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True),
          mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True),
          mock.patch.object(datasets.config, "HF_DATASETS_OFFLINE", True)):
        harness_log = logging.getLogger("lm_eval")
        level = harness_log.level
        # Its warnings are about options we do not use (accelerate launch with a passed-in model, --metadata).
        harness_log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            harness_log.setLevel(level)


def task_manager(tasks: Sequence[str], tasks_dir: str | None):
    """lm-eval's TaskManager that knows every task in ``tasks`` (names, tags or groups), checked before any
    model is loaded. Only the local folder is indexed when it has them all; lm-eval's built-in tasks
    (thousands of YAMLs, seconds to index) only when it does not."""
    lm_eval_version()
    from lm_eval.tasks import TaskManager

    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        raise UserError(f"benchmark_tasks {tasks_dir}: not a folder of lm-eval task YAMLs")
    local = TaskManager(include_path=tasks_dir, include_defaults=False) if tasks_dir else None
    if local is not None and set(tasks) <= set(local.all_tasks):
        return local
    manager = TaskManager(include_path=tasks_dir)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = (f"{tasks_dir} has {', '.join(local.all_tasks) or 'no tasks'}" if local is not None else
                 "pass benchmark_tasks (--benchmark-tasks DIR), a folder of task YAMLs like examples/benchmarks")
        raise UserError(f"unknown benchmark task {unknown[0]!r}: {where}")
    return manager


def run_benchmarks(model, tokenizer, tasks: Sequence[str], manager, limit: int | None, batch_size: int) -> dict:
    """Scores of ``model`` on ``tasks`` (see ``benchmark_scores``), ``limit`` examples per task at most.
    lm-eval's own default seeds, so the numbers match an ``lm_eval`` command line run on the same tasks
    (it reseeds Python's, NumPy's and torch's global generators; the eval stage reseeds before sampling)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    with offline_harness():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                          log_samples=False)
    return benchmark_scores(results)


def _number(value) -> float | None:
    """A finite number as a float; None for lm-eval's "N/A" and for nan / inf."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def benchmark_scores(results: dict) -> dict[str, dict]:
    """lm-eval's results dict reduced to ``{task: {"samples", "version", "metrics": {name: {"value",
    "stderr"}}}}``: one entry per task and group it reports; a stderr lm-eval could not compute is None."""
    scores: dict[str, dict] = {}
    for task, row in results["results"].items():
        metrics: dict[str, dict] = {}
        for key, value in row.items():
            metric, sep, filter_name = key.partition(",")
            if not sep or metric.endswith("_stderr") or _number(value) is None:
                continue
            name = metric if filter_name == "none" else key
            metrics[name] = {"value": _number(value), "stderr": _number(row.get(f"{metric}_stderr,{filter_name}"))}
        counts = results.get("n-samples", {}).get(task, {})
        scores[task] = {"samples": counts.get("effective"), "version": results.get("versions", {}).get(task),
                        "metrics": metrics}
    return scores
