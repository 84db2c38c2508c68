"""``alignloop run PIPELINE.yaml``: the alignment loop as one resumable command.

    <output_dir>/sft                       SFT of the base model
    <output_dir>/round-N/collect           the current policy writes K candidates per prompt into a feedback round
    <output_dir>/round-N/label             people (human mode) or simulated annotators (through the app's HTTP
                                           API) rank and rate them; reviewers judge the last round's PPO samples
    <output_dir>/round-N/rm                reward model on ALL feedback so far (every round's labels + reviews)
    <output_dir>/round-N/ppo               PPO continuing from the current policy against that reward model
    <output_dir>/round-N/dpo               or, in a round with ``algorithm: dpo``, instead of rm and ppo: DPO
                                           (or IPO, SimPO, KTO, ...) of the current policy on ALL feedback so far
    <output_dir>/round-N/eval              the new policy against the SFT model (gold, reward, KL, win rates)
    <output_dir>/report.html               the HTML report of everything above

Every stage folder gets a FINISHED marker when done; finished stages are skipped, so re-running the same
command after a crash or a kill continues with the first unfinished stage, which itself resumes from its
last checkpoint (the stages do that on their own when pointed at the same folder). ``--from STAGE`` deletes
and reruns that stage and every later one; ``--force`` reruns everything. ``stages.jsonl`` logs every
start / skip / finish, so what was (re)done is visible afterwards.

In human mode the runner stops after collect with the URL of the labelling app and the number of labels
still needed (exit code 3); re-running once the quota is met picks up at the reward model.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from alignloop.config import (
    DPOConfig,
    EvalConfig,
    PPOConfig,
    RMConfig,
    SamplingConfig,
    SFTConfig,
    Strict,
    build_config,
    check_sampled,
    dump_config,
    set_dotted,
    validate_config,
)
from alignloop.data.io import read_records
from alignloop.data.synthetic import write_jsonl
from alignloop.errors import UserError
from alignloop.evaluate.eval import run_eval
from alignloop.evaluate.report import build_report
from alignloop.feedback import rounds
from alignloop.feedback.collect import collect, gold_ordered_pairs
from alignloop.feedback.export import to_jsonl
from alignloop.feedback.simulate import SimulatedAnnotation
from alignloop.rl.rewards import import_callable
from alignloop.runs import FINISHED, RunDir, atomic_write_json, atomic_write_text, read_metrics
from alignloop.train.dpo import run_dpo
from alignloop.train.ppo import run_ppo
from alignloop.train.reward import run_rm
from alignloop.train.sft import run_sft

log = logging.getLogger(__name__)

WAITING_FOR_LABELS = 3  # exit code of `alignloop run` when human labels are still missing


# ---------------------------------------------------------------- configuration


class CollectSettings(Strict):
    """Candidate generation for each round: ``prompts_per_round`` prompts (a different seeded draw each
    round) from ``prompts``, K samples each from the current policy, sampled as ``generation`` says
    (16 prompts per call unless set). Each round is seeded with sft.train.seed + the round number."""

    prompts: str
    prompts_per_round: int = Field(64, gt=0)
    k: int = Field(4, ge=2)
    generation: SamplingConfig = SamplingConfig(batch_size=16)

    @model_validator(mode="after")
    def _sampled(self) -> CollectSettings:
        check_sampled(self.generation, "sft.train.seed + the round number")
        return self


class FeedbackSettings(Strict):
    mode: Literal["simulated", "human"] = "simulated"
    db: str | None = None  # SQLite path or database URL; default <output_dir>/feedback.db
    url: str = "http://127.0.0.1:8000"  # where people reach `alignloop label` (human mode message)
    overlap: int = Field(1, gt=0)  # people per item
    label_quota: int | None = Field(None, gt=0)  # labels needed per round; default every item x overlap
    simulated: SimulatedAnnotation = SimulatedAnnotation()


Algorithm = Literal["ppo", "dpo"]
ALGORITHMS: tuple[str, ...] = Algorithm.__args__


class PipelineConfig(Strict):
    """The whole loop. ``rm``, ``ppo``, ``dpo`` and ``eval`` are the stages' own configs (as in
    examples/rm.yaml, ppo.yaml, dpo.yaml, eval.yaml) minus what the runner wires in: model paths, data files
    and output folders. ``algorithm`` picks what a round trains after labelling: ppo (a reward model on all
    feedback so far, then PPO against it) or dpo (direct preference optimisation on all feedback so far:
    online iterative DPO)."""

    output_dir: str = "runs/pipeline"
    rounds: int = Field(2, gt=0)
    sft: SFTConfig
    collect: CollectSettings
    feedback: FeedbackSettings = FeedbackSettings()
    algorithm: Algorithm = "ppo"
    rm: dict[str, Any] = {}
    ppo: dict[str, Any] = {}
    dpo: dict[str, Any] = {}
    eval: dict[str, Any] = {}
    # Per round number, settings laid over ``rm`` / ``ppo`` / ``dpo`` / ``eval`` for that round only, and
    # that round's ``algorithm``, e.g. {2: {"ppo": {"ppo": {"steps": 40}}}} or {2: {"algorithm": "dpo"}}.
    round_overrides: dict[int, dict[Literal["algorithm", "rm", "ppo", "dpo", "eval"], Any]] = {}
    report_gold: str | None = None  # gold function for the report's over-optimisation plot


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """The pipeline YAML with ``key.path=value`` overrides laid over it, every stage's config checked."""
    cfg = build_config(PipelineConfig, path, overrides=overrides)
    plan(cfg)  # every stage config is validated now, not an hour into the run
    return cfg


# ---------------------------------------------------------------- the plan: stage configs, wired


def _merge(user: dict, wired: dict[str, Any]) -> dict:
    """The user's stage config with the runner's paths filled in where the user set none."""
    tree = copy.deepcopy(user)
    for dotted, value in wired.items():
        node, parts = tree, dotted.split(".")
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node.get(part), dict) else {}
        if node.get(parts[-1]) in (None, "") or dotted.endswith("output_dir"):
            set_dotted(tree, parts, value)
    return tree


def _overlaid(base: dict, over: dict) -> dict:
    """``base`` with every leaf of ``over`` set in it (nested dicts merge, anything else replaces)."""
    tree = copy.deepcopy(base)

    def walk(node: dict, path: list[str]) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, [*path, key])
            else:
                set_dotted(tree, [*path, key], copy.deepcopy(value))

    walk(over, [])
    return tree


@dataclass
class Stage:
    name: str  # "sft", "round-1/collect", ...
    folder: Path
    round: int = 0
    config: Any = None


def plan(cfg: PipelineConfig) -> list[Stage]:
    root = Path(cfg.output_dir)
    sft_model = root / "sft" / "model"
    stages = [Stage("sft", root / "sft", 0, cfg.sft.model_copy(update={"output_dir": str(root / "sft")}))]
    unknown = sorted(set(cfg.round_overrides) - set(range(1, cfg.rounds + 1)))
    if unknown:
        raise UserError(f"round_overrides: round {unknown[0]}, but the pipeline has rounds 1-{cfg.rounds}")
    policy = sft_model
    for n in range(1, cfg.rounds + 1):
        over = cfg.round_overrides.get(n, {})
        algorithm = over.get("algorithm", cfg.algorithm)
        if algorithm not in ALGORITHMS:
            raise UserError(f"round_overrides.{n}.algorithm: {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
        user = {name: _overlaid(getattr(cfg, name), over.get(name, {})) for name in ("rm", "ppo", "dpo", "eval")}
        rdir = root / f"round-{n}"
        where = f" (round {n})" if over else ""
        stages += [Stage(f"round-{n}/collect", rdir / "collect", n, policy),
                   Stage(f"round-{n}/label", rdir / "label", n)]
        test = {"data.test": str(rdir / "collect" / "gold_test.jsonl")} if gold_test(cfg) else {}
        scored_by: dict[str, str] = {}
        if algorithm == "ppo":
            rm_cfg = validate_config(RMConfig, _merge(user["rm"], {
                "output_dir": str(rdir / "rm"), "model.name_or_path": str(sft_model),
                "data.train": str(rdir / "rm" / "feedback.jsonl"), **test}), "rm" + where)
            ppo_cfg = validate_config(PPOConfig, _merge(user["ppo"], {
                "output_dir": str(rdir / "ppo"), "model.name_or_path": str(policy),
                "reward.model": str(rdir / "rm"), "data.train": cfg.collect.prompts}), "ppo" + where)
            stages += [Stage(f"round-{n}/rm", rdir / "rm", n, rm_cfg), Stage(f"round-{n}/ppo", rdir / "ppo", n, ppo_cfg)]
            scored_by = {"reward_model": str(rdir / "rm" / "model")}
        else:
            # The round's own policy is DPO's reference; the gold-ordered test pairs are its held-out pairs.
            dpo_cfg = validate_config(DPOConfig, _merge(user["dpo"], {
                "output_dir": str(rdir / "dpo"), "model.name_or_path": str(policy),
                "data.train": str(rdir / "dpo" / "feedback.jsonl"), **test}), "dpo" + where)
            stages.append(Stage(f"round-{n}/dpo", rdir / "dpo", n, dpo_cfg))
        trained = rdir / algorithm / "model"
        eval_cfg = validate_config(EvalConfig, _merge(user["eval"], {
            "output_dir": str(rdir / "eval"), "policy": str(trained), "baseline": str(sft_model),
            **scored_by, "feedback_db": feedback_db(cfg)}), "eval" + where)
        stages.append(Stage(f"round-{n}/eval", rdir / "eval", n, eval_cfg))
        policy = trained
    return stages


def gold_test(cfg: PipelineConfig) -> bool:
    return cfg.feedback.mode == "simulated" and cfg.feedback.simulated.gold_test_prompts > 0


def feedback_db(cfg: PipelineConfig) -> str:
    return cfg.feedback.db or str(Path(cfg.output_dir) / "feedback.db")


# ---------------------------------------------------------------- stages that are not a trainer


def _round_prompts(cfg: PipelineConfig, n: int) -> list[dict]:
    """This round's prompts: a seeded draw without replacement, different every round."""
    records = [r.data for r in read_records(cfg.collect.prompts)]
    rng = random.Random(f"collect-{cfg.sft.train.seed}-{n}")
    extra = cfg.feedback.simulated.gold_test_prompts if gold_test(cfg) else 0
    return rng.sample(records, min(cfg.collect.prompts_per_round + extra, len(records)))


def run_collect(cfg: PipelineConfig, stage: Stage) -> dict:
    c, db = cfg.collect, feedback_db(cfg)
    shutil.rmtree(stage.folder, ignore_errors=True)  # nothing to resume: generation restarts
    drawn = _round_prompts(cfg, stage.round)
    prompts = write_jsonl(stage.folder / "prompts.jsonl", drawn[:c.prompts_per_round])
    name = rounds.fresh_round_name(db, stage.round)
    seed = cfg.sft.train.seed + stage.round
    n = collect(str(stage.config), str(prompts), db, name, k=c.k,
                sampling=c.generation.model_copy(update={"seed": seed}), overlap=cfg.feedback.overlap,
                model_label=stage.name)
    summary = {"round": name, "items": n, "policy": str(stage.config)}
    if gold_test(cfg):
        # The reward model's test set: candidates of prompts nobody labels, each pair ordered by the gold.
        pairs = gold_ordered_pairs(str(stage.config), drawn[c.prompts_per_round:], c.k,
                                   c.generation.model_copy(update={"seed": seed + 10_000}),
                                   import_callable(cfg.feedback.simulated.gold_total))
        write_jsonl(stage.folder / "gold_test.jsonl", pairs)
        summary["gold_test_pairs"] = len(pairs)
    return summary


def _stage_summary(folder: Path) -> dict:
    return json.loads((folder / FINISHED).read_text())


class LabelsMissing(Exception):
    def __init__(self, message: str):
        super().__init__(message)


def run_label(cfg: PipelineConfig, stage: Stage) -> dict:
    """Simulated mode: the simulated people fill the round (reviewing the last round's PPO samples from round
    2 on). Human mode, or simulated with the quota not met: LabelsMissing, saying where to label."""
    collected = _stage_summary(stage.folder.parent / "collect")
    name, db = collected["round"], feedback_db(cfg)
    quota = cfg.feedback.label_quota or collected["items"] * cfg.feedback.overlap
    if cfg.feedback.mode == "simulated" and rounds.round_progress(db, name)["labels"] < quota:
        # A round after a PPO round reviews its samples; after a DPO round (no samples) there is nothing to review.
        previous = Path(cfg.output_dir) / f"round-{stage.round - 1}" / "ppo" / "samples.jsonl"
        samples = read_metrics(previous) if stage.round > 1 and previous.is_file() else None
        rounds.simulate_round(db, name, quota, cfg.feedback.simulated, seed=cfg.sft.train.seed * 100 + stage.round,
                              policy_samples=samples)
    done = rounds.round_progress(db, name)["labels"]
    if done < quota:
        raise LabelsMissing(
            f"round {stage.round}: {done} of {quota} labels so far; {quota - done} more needed in feedback round "
            f"'{name}'. Label them at {cfg.feedback.url}/ (start the app: alignloop label --db {db}), then run "
            "the same command again to continue.")
    return {"round": name, "labels": done, "quota": quota}


def run_feedback_stage(cfg: PipelineConfig, stage: Stage, train: Callable[[Any], object]) -> dict:
    """Export every round so far (labels and reviews) into one training file, then train on it (the reward
    model, or DPO)."""
    names = [_stage_summary(Path(cfg.output_dir) / f"round-{n}" / "collect")["round"]
             for n in range(1, stage.round + 1)]
    records = rounds.export_rounds(feedback_db(cfg), names)
    data = Path(stage.config.data.train)
    if not data.is_file():  # written once: a resumed stage must see the same data
        atomic_write_text(data, to_jsonl(records))
    train(stage.config)
    return {"rounds": names, "records": len(records),
            "reviews": sum(r.get("source") == "review" for r in records)}


# ---------------------------------------------------------------- the runner


class StageLog:
    """stages.jsonl: one line per start / skip / finish, so a resumed run shows what it redid."""

    def __init__(self, root: Path):
        self.path = root / "stages.jsonl"

    def write(self, stage: str, event: str, **extra: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"stage": stage, "event": event, "time": time.time(), **extra}) + "\n")


def _run_stage(cfg: PipelineConfig, stage: Stage) -> dict:
    kind = stage.name.rsplit("/", 1)[-1]
    if kind == "sft":
        run_sft(stage.config)
        return {}
    if kind == "collect":
        return run_collect(cfg, stage)
    if kind == "label":
        return run_label(cfg, stage)
    if kind == "rm":
        return run_feedback_stage(cfg, stage, run_rm)
    if kind == "dpo":
        return run_feedback_stage(cfg, stage, run_dpo)
    if kind == "ppo":
        run_ppo(stage.config)
        return {}
    run_eval(stage.config)
    return {}


def run_pipeline(cfg: PipelineConfig, start_from: str | None = None, force: bool = False,
                 on_stage: Callable[[Stage], None] | None = None) -> Path:
    """Run every unfinished stage in order; returns the report's path. Raises LabelsMissing in human mode
    while a round still needs labels."""
    root = Path(cfg.output_dir)
    stages = plan(cfg)
    names = [s.name for s in stages]
    if start_from is not None and start_from not in names:
        raise UserError(f"--from: unknown stage {start_from!r}; stages: {', '.join(names)}")
    redo = set(names) if force else set(names[names.index(start_from):]) if start_from else set()
    root.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, root / "pipeline.yaml")
    stage_log = StageLog(root)
    for stage in stages:
        if stage.name in redo:
            shutil.rmtree(stage.folder, ignore_errors=True)
            redo.discard(stage.name)
        if RunDir(stage.folder).is_finished():
            stage_log.write(stage.name, "skip")
            continue
        log.info("stage %s -> %s", stage.name, stage.folder)
        stage_log.write(stage.name, "start")
        if on_stage is not None:
            on_stage(stage)
        summary = _run_stage(cfg, stage)
        if stage.name.endswith(("collect", "label", "rm", "dpo")):
            # collect and label have no trainer to mark them; rm's and dpo's markers gain the feedback summary.
            old = _stage_summary(stage.folder) if RunDir(stage.folder).is_finished() else {}
            atomic_write_json(stage.folder / FINISHED, {"finished_at": time.time(), **old, "stage": stage.name,
                                                        **summary})
        stage_log.write(stage.name, "finish")
    return build_report(root, gold=cfg.report_gold, title=root.name)
