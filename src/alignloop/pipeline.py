"""``alignloop run PIPELINE.yaml``: the alignment loop as one resumable command.

    <output_dir>/sft                       SFT of the base model
    <output_dir>/round-N/collect           the current policy writes K candidates per prompt into a feedback round
    <output_dir>/round-N/label             people (human mode) or simulated annotators (through the app's HTTP
                                           API) rank and rate them; reviewers judge the last round's PPO samples
    <output_dir>/round-N/rm                reward model on ALL feedback so far (every round's labels + reviews)
    <output_dir>/round-N/ppo               PPO continuing from the current policy against that reward model
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
import math
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from alignloop.config import (
    EvalConfig,
    PPOConfig,
    RMConfig,
    SamplingConfig,
    SFTConfig,
    Strict,
    check_sampled,
    describe_validation_error,
    dump_config,
    read_yaml,
    set_dotted,
)
from alignloop.data.synthetic import GOLD_WEIGHTS
from alignloop.errors import UserError
from alignloop.runs import FINISHED, RunDir, atomic_write_json

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


class SimulatedAnnotation(Strict):
    """Simulated people: ``gold(prompt, response) -> {criterion: rating}`` seen through per-person bias
    and noise. Reviewers approve a PPO sample when its gold total is at least ``approve_at``."""

    gold: str = "alignloop.data.synthetic:gold_ratings"
    gold_total: str = "alignloop.data.synthetic:gold_total"
    annotators: int = Field(3, gt=0)
    reviewers: int = Field(1, ge=0)
    noise: float = Field(0.5, ge=0)
    bias_scale: float = Field(0.3, ge=0)
    # How the annotators weigh the criteria when they rank: as gold_total does (the default gold's weights),
    # so that their judgement is the gold score plus noise and bias. null = equally.
    weights: dict[str, float] | None = Field(default_factory=lambda: dict(GOLD_WEIGHTS))
    review_samples: int = Field(16, ge=0)  # of the previous round's PPO samples, shown to reviewers
    approve_at: float = Field(0.6, ge=0, le=1)
    # Extra prompts per round whose candidates nobody labels: ordered by gold_total instead, they are the
    # reward model's test set (accuracy against the gold preferences, on what the current policy writes).
    gold_test_prompts: int = Field(0, ge=0)


class FeedbackSettings(Strict):
    mode: Literal["simulated", "human"] = "simulated"
    db: str | None = None  # SQLite path or database URL; default <output_dir>/feedback.db
    url: str = "http://127.0.0.1:8000"  # where people reach `alignloop label` (human mode message)
    overlap: int = Field(1, gt=0)  # people per item
    label_quota: int | None = Field(None, gt=0)  # labels needed per round; default every item x overlap
    simulated: SimulatedAnnotation = SimulatedAnnotation()


class PipelineConfig(Strict):
    """The whole loop. ``rm``, ``ppo`` and ``eval`` are the stages' own configs (as in examples/rm.yaml,
    ppo.yaml, eval.yaml) minus what the runner wires in: model paths, data files and output folders."""

    output_dir: str = "runs/pipeline"
    rounds: int = Field(2, gt=0)
    sft: SFTConfig
    collect: CollectSettings
    feedback: FeedbackSettings = FeedbackSettings()
    rm: dict[str, Any] = {}
    ppo: dict[str, Any] = {}
    eval: dict[str, Any] = {}
    # Per round number, settings laid over ``rm`` / ``ppo`` / ``eval`` for that round only,
    # e.g. {2: {"ppo": {"ppo": {"steps": 40}}}}.
    round_overrides: dict[int, dict[Literal["rm", "ppo", "eval"], dict[str, Any]]] = {}
    report_gold: str | None = None  # gold function for the report's over-optimisation plot


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    from alignloop.config import parse_override

    tree = read_yaml(path)
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(tree, key, value)
    try:
        cfg = PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc, str(path))) from None
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


def _validate(cls, tree: dict, where: str):
    try:
        return cls.model_validate(tree)
    except ValidationError as exc:
        raise UserError(describe_validation_error(exc, where)) from None


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
    for n in range(1, cfg.rounds + 1):
        over = cfg.round_overrides.get(n, {})
        user = {name: _overlaid(getattr(cfg, name), over.get(name, {})) for name in ("rm", "ppo", "eval")}
        rdir = root / f"round-{n}"
        policy = sft_model if n == 1 else root / f"round-{n - 1}" / "ppo" / "model"
        wired = {"output_dir": str(rdir / "rm"), "model.name_or_path": str(sft_model),
                 "data.train": str(rdir / "rm" / "feedback.jsonl")}
        if gold_test(cfg):
            wired["data.test"] = str(rdir / "collect" / "gold_test.jsonl")
        where = f" (round {n})" if over else ""
        rm_cfg = _validate(RMConfig, _merge(user["rm"], wired), "rm" + where)
        ppo_cfg = _validate(PPOConfig, _merge(user["ppo"], {
            "output_dir": str(rdir / "ppo"), "model.name_or_path": str(policy),
            "reward.model": str(rdir / "rm"), "data.train": cfg.collect.prompts}), "ppo" + where)
        eval_cfg = _validate(EvalConfig, _merge(user["eval"], {
            "output_dir": str(rdir / "eval"), "policy": str(rdir / "ppo" / "model"), "baseline": str(sft_model),
            "reward_model": str(rdir / "rm" / "model"), "feedback_db": feedback_db(cfg)}), "eval" + where)
        stages += [Stage(f"round-{n}/collect", rdir / "collect", n, policy),
                   Stage(f"round-{n}/label", rdir / "label", n),
                   Stage(f"round-{n}/rm", rdir / "rm", n, rm_cfg),
                   Stage(f"round-{n}/ppo", rdir / "ppo", n, ppo_cfg),
                   Stage(f"round-{n}/eval", rdir / "eval", n, eval_cfg)]
    return stages


def gold_test(cfg: PipelineConfig) -> bool:
    return cfg.feedback.mode == "simulated" and cfg.feedback.simulated.gold_test_prompts > 0


def feedback_db(cfg: PipelineConfig) -> str:
    return cfg.feedback.db or str(Path(cfg.output_dir) / "feedback.db")


# ---------------------------------------------------------------- stages that are not a trainer


def _round_prompts(cfg: PipelineConfig, n: int) -> list[dict]:
    """This round's prompts: a seeded draw without replacement, different every round."""
    import random

    from alignloop.data.io import read_records

    records = [r.data for r in read_records(cfg.collect.prompts)]
    rng = random.Random(f"collect-{cfg.sft.train.seed}-{n}")
    extra = cfg.feedback.simulated.gold_test_prompts if gold_test(cfg) else 0
    return rng.sample(records, min(cfg.collect.prompts_per_round + extra, len(records)))


def _fresh_round_name(db_url: str, n: int) -> str:
    """A round name not yet in the database: a rerun of collect never appends to an older attempt."""
    from alignloop.feedback import tasks
    from alignloop.feedback.db import open_db

    with open_db(db_url)() as db:
        for attempt in range(1, 1000):
            name = f"round-{n}" if attempt == 1 else f"round-{n}.{attempt}"
            try:
                tasks.get_round(db, name)
            except tasks.NotFound:
                return name
    raise UserError(f"{db_url}: too many attempts of round {n}")


def run_collect(cfg: PipelineConfig, stage: Stage) -> dict:
    from alignloop.data.synthetic import write_jsonl
    from alignloop.feedback.collect import collect

    c, db = cfg.collect, feedback_db(cfg)
    shutil.rmtree(stage.folder, ignore_errors=True)  # nothing to resume: generation restarts
    drawn = _round_prompts(cfg, stage.round)
    prompts = write_jsonl(stage.folder / "prompts.jsonl", drawn[:c.prompts_per_round])
    name = _fresh_round_name(db, stage.round)
    seed = cfg.sft.train.seed + stage.round
    n = collect(str(stage.config), str(prompts), db, name, k=c.k,
                sampling=c.generation.model_copy(update={"seed": seed}), overlap=cfg.feedback.overlap,
                model_label=stage.name)
    summary = {"round": name, "items": n, "policy": str(stage.config)}
    if gold_test(cfg):
        pairs = gold_test_pairs(cfg, str(stage.config), drawn[c.prompts_per_round:], seed)
        write_jsonl(stage.folder / "gold_test.jsonl", pairs)
        summary["gold_test_pairs"] = len(pairs)
    return summary


def gold_test_pairs(cfg: PipelineConfig, policy: str, prompts: list[dict], seed: int) -> list[dict]:
    """K candidates per held-out prompt from the policy, every pair ordered by the gold function."""
    import itertools

    from alignloop.config import ModelConfig
    from alignloop.feedback.collect import generate_candidates, prompt_text
    from alignloop.generation.sampler import inference_device
    from alignloop.models.load import load_pretrained
    from alignloop.rl.rewards import import_callable

    c, gold = cfg.collect, import_callable(cfg.feedback.simulated.gold_total)
    device = inference_device()
    model, tok = load_pretrained(ModelConfig(name_or_path=policy), device=device, for_training=False)
    sampling = c.generation.model_copy(update={"seed": seed + 10_000})
    texts = [p.get("prompt") or p.get("messages") for p in prompts]
    pairs = []
    for prompt, responses in zip(texts, generate_candidates(model.to(device).eval(), tok, texts, c.k, sampling),
                                 strict=True):
        shown = prompt_text(prompt)
        for a, b in itertools.combinations(responses, 2):
            ga, gb = gold(shown, a), gold(shown, b)
            if ga != gb:  # the gold difference is kept as "margin": eval.json has accuracy by gold margin
                chosen, rejected = (a, b) if ga > gb else (b, a)
                pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                              "margin": round(abs(ga - gb), 4)})
    return pairs


def _stage_summary(folder: Path) -> dict:
    return json.loads((folder / FINISHED).read_text())


def _progress(db_url: str, round_name: str) -> dict:
    from alignloop.feedback import tasks
    from alignloop.feedback.db import open_db

    with open_db(db_url)() as db:
        return tasks.round_progress(db, tasks.get_round(db, round_name))


class LabelsMissing(Exception):
    def __init__(self, message: str):
        super().__init__(message)


def run_label(cfg: PipelineConfig, stage: Stage) -> dict:
    collected = _stage_summary(stage.folder.parent / "collect")
    name, db = collected["round"], feedback_db(cfg)
    quota = cfg.feedback.label_quota or collected["items"] * cfg.feedback.overlap
    if cfg.feedback.mode == "simulated" and _progress(db, name)["labels"] < quota:
        simulate_round(cfg, stage, name, quota)
    done = _progress(db, name)["labels"]
    if done < quota:
        raise LabelsMissing(
            f"round {stage.round}: {done} of {quota} labels so far; {quota - done} more needed in feedback round "
            f"'{name}'. Label them at {cfg.feedback.url}/ (start the app: alignloop label --db {db}), then run "
            "the same command again to continue.")
    return {"round": name, "labels": done, "quota": quota}


def run_rm_stage(cfg: PipelineConfig, stage: Stage) -> dict:
    """Export every round so far (labels and reviews) into one training file, then train."""
    from alignloop.feedback import tasks
    from alignloop.feedback.db import open_db
    from alignloop.feedback.export import export_records, to_jsonl
    from alignloop.runs import atomic_write_text
    from alignloop.train.reward import run_rm

    names = [_stage_summary(Path(cfg.output_dir) / f"round-{n}" / "collect")["round"]
             for n in range(1, stage.round + 1)]
    records: list[dict] = []
    with open_db(feedback_db(cfg))() as db:
        for name in names:  # rankings (reviews included) and each response's ratings: both train the model
            rnd = tasks.get_round(db, name)
            records += export_records(db, rnd, "rankings") + export_records(db, rnd, "ratings")
    data = Path(stage.config.data.train)
    if not data.is_file():  # written once: a resumed reward model must see the same data
        atomic_write_text(data, to_jsonl(records))
    run_rm(stage.config)
    return {"rounds": names, "records": len(records),
            "reviews": sum(r.get("source") == "review" for r in records)}


# ---------------------------------------------------------------- simulated people, through the HTTP API


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FeedbackServer:
    """The feedback app served by uvicorn on 127.0.0.1 in a background thread (for the simulated people)."""

    def __init__(self, db_url: str):
        import uvicorn

        from alignloop.feedback.web.app import create_app

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(db_url), host="127.0.0.1", port=self.port, log_level="warning",
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FeedbackServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the feedback app did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _simulated_people(db_url: str, names: dict[str, str]) -> str:
    """Create (or re-key) the simulated users; returns their shared password for this run."""
    from sqlalchemy import select

    from alignloop.feedback import auth
    from alignloop.feedback.db import User, open_db

    password = secrets.token_urlsafe(18)
    with open_db(db_url)() as db:
        for name, role in names.items():
            user = db.scalar(select(User).where(User.username == name))
            if user is None:
                auth.create_user(db, name, role, password)
            else:
                auth.set_password(user, password)
        db.commit()
    return password


def _add_policy_samples(cfg: PipelineConfig, stage: Stage, round_name: str) -> int:
    """The previous round's PPO samples go into this round's review queue, latest first, preferring prompts
    that were sampled more than once: reviews of two samples of one prompt become a training pair."""
    from collections import Counter

    from alignloop.feedback import tasks
    from alignloop.feedback.db import open_db
    from alignloop.runs import read_metrics

    samples = read_metrics(Path(cfg.output_dir) / f"round-{stage.round - 1}" / "ppo" / "samples.jsonl")[::-1]
    seen = Counter(s["prompt"] for s in samples)
    samples = sorted(samples, key=lambda s: seen[s["prompt"]] < 2)[:cfg.feedback.simulated.review_samples]
    if not samples:
        return 0
    with open_db(feedback_db(cfg))() as db:
        rnd = tasks.get_round(db, round_name)
        if tasks.round_progress(db, rnd)["policy_samples"] == 0:
            tasks.add_items(db, rnd, samples, kind="policy")
    return len(samples)


def _review(url: str, username: str, password: str, round_name: str, approve: Callable[[str, str], bool]) -> int:
    import httpx

    with httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/api/login", json={"username": username, "password": password})
        r.raise_for_status()
        client.headers["Authorization"] = f"Bearer {r.json()['token']}"
        n = 0
        while (r := client.post(f"/api/rounds/{round_name}/review/next")).status_code == 200:
            sample = r.json()
            body = ({"decision": "approve"} if approve(sample["prompt"], sample["response"])
                    else {"decision": "flag", "reason": "below the reviewer's bar"})
            client.post(f"/api/reviews/{sample['sample_id']}", json=body).raise_for_status()
            n += 1
        r.raise_for_status()
    return n


def simulate_round(cfg: PipelineConfig, stage: Stage, round_name: str, quota: int) -> None:
    from alignloop.data.synthetic import make_annotators
    from alignloop.feedback.simulate import AnnotatorClient, run_annotators
    from alignloop.rl.rewards import import_callable

    sim, db = cfg.feedback.simulated, feedback_db(cfg)
    annotators = [f"sim-annotator-{i + 1}" for i in range(sim.annotators)]
    reviewers = [f"sim-reviewer-{i + 1}" for i in range(sim.reviewers)] if stage.round > 1 else []
    password = _simulated_people(db, {**dict.fromkeys(annotators, "annotator"), **dict.fromkeys(reviewers, "reviewer")})
    if reviewers:
        _add_policy_samples(cfg, stage, round_name)
    gold, total = import_callable(sim.gold), import_callable(sim.gold_total)
    with FeedbackServer(db) as server:
        people = [AnnotatorClient(server.url, password, a)
                  for a in make_annotators(annotators, gold, noise=sim.noise, bias_scale=sim.bias_scale,
                                           seed=cfg.sft.train.seed * 100 + stage.round, weights=sim.weights)]
        # In turn, not in threads: who labels which task then does not depend on timing, so a seeded run
        # gets the same labels every time (with threads, two runs of one seed ranked most items differently).
        done = run_annotators(people, round_name, max_labels=math.ceil(quota / len(people)), concurrent=False)
        reviewed = sum(_review(server.url, name, password, round_name, lambda p, r: total(p, r) >= sim.approve_at)
                       for name in reviewers)
    log.info("round %d: simulated labels %s, %d reviews", stage.round, done, reviewed)


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
        from alignloop.train.sft import run_sft

        run_sft(stage.config)
        return {}
    if kind == "collect":
        return run_collect(cfg, stage)
    if kind == "label":
        return run_label(cfg, stage)
    if kind == "rm":
        return run_rm_stage(cfg, stage)
    if kind == "ppo":
        from alignloop.train.ppo import run_ppo

        run_ppo(stage.config)
        return {}
    from alignloop.evaluate.eval import run_eval

    run_eval(stage.config)
    return {}


def run_pipeline(cfg: PipelineConfig, start_from: str | None = None, force: bool = False,
                 on_stage: Callable[[Stage], None] | None = None) -> Path:
    """Run every unfinished stage in order; returns the report's path. Raises LabelsMissing in human mode
    while a round still needs labels."""
    from alignloop.evaluate.report import build_report

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
        if stage.name.endswith(("collect", "label", "rm")):
            # collect and label have no trainer to mark them; rm's marker gains the feedback summary.
            old = _stage_summary(stage.folder) if RunDir(stage.folder).is_finished() else {}
            atomic_write_json(stage.folder / FINISHED, {"finished_at": time.time(), **old, "stage": stage.name,
                                                        **summary})
        stage_log.write(stage.name, "finish")
    return build_report(root, gold=cfg.report_gold, title=root.name)
