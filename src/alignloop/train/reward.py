"""Reward modelling from human feedback, top to bottom.

read + validate feedback (pairs, HH-RLHF dialogues, rankings with ties, ratings) -> clean -> split
-> comparison groups (identical pairs dropped and counted) -> load the backbone with one scalar head
(or one per criterion) -> tokenize each response once -> fit (K-wise Bradley-Terry + ratings +
centring) -> normalisation statistics over the training responses -> evaluate validation and test
into eval.json -> save model/ with its meta -> FINISHED.

A training unit is a *group*: one preference pair, one prompt's whole ranking (all its C(K,2)
pairs land in the same batch, each response encoded once) or one rating record.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, set_seed

from alignloop.config import RMConfig
from alignloop.data.batching import prompt_response_batch, right_pad
from alignloop.data.formats import (
    Feedback,
    PreferencePair,
    Rating,
    parse_feedback,
    ranking_groups,
)
from alignloop.data.io import Record
from alignloop.data.splits import load_splits
from alignloop.data.tokenize import ensure_chat_template
from alignloop.errors import UserError
from alignloop.models.forward import body_and_score_head, scored_hidden_states, shares_prompt
from alignloop.models.load import (
    count_parameters,
    load_pretrained,
    planned_matmul_parameters,
    prepare_for_training,
    save_model,
)
from alignloop.models.reward import (
    combine_criteria,
    encode_for_reward,
    head_scores,
    model_max_len,
)
from alignloop.runs import RunDir, atomic_write_json
from alignloop.stats import pairwise_agreement
from alignloop.train.reward_losses import (
    bradley_terry,
    group_mean_sum,
    ordinal_loss,
    ranking_pairs,
    rating_targets,
    regression_loss,
)
from alignloop.training.accelerator import make_accelerator
from alignloop.training.finish import finish_run
from alignloop.training.fit import fit
from alignloop.training.resume import SUPERVISED_MUTABLE, open_run

log = logging.getLogger(__name__)

COMBINED = -1  # "column" of the weighted combination of all heads


@dataclass
class RatingTarget:
    column: int  # criterion head, or COMBINED
    criterion: str  # criterion name, or "score" for the overall score
    value: float
    low: float
    high: float
    weight: float  # share of this rating record's loss
    response: int = 0  # which of the unit's responses it rates


@dataclass
class Group:
    """One training unit: a pair, a ranking of K responses to one prompt, or a rating of one response."""

    prompt: str | list[dict]
    responses: list[str]
    where: str
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (better, worse)
    margins: list[float | None] = field(default_factory=list)
    criterion: str | None = None  # the criterion a comparison was judged on (None: overall)
    column: int = COMBINED  # the head its comparisons train: the criterion's head in multi-criteria mode
    ratings: list[RatingTarget] = field(default_factory=list)
    annotator: str | None = None
    identical_pairs: int = 0
    records: int = 1  # feedback records in the unit: a ranking joined by the ratings of its responses counts all

    @property
    def prompt_key(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else json.dumps(self.prompt, sort_keys=True)


@dataclass
class Encoded:
    group: Group
    seqs: list[list[int]]

    def __len__(self) -> int:
        return sum(len(s) for s in self.seqs)


# ---------------------------------------------------------------- records -> groups


def _prompt(fb: Feedback) -> str | list[dict]:
    return fb.prompt if isinstance(fb.prompt, str) else [m.model_dump() for m in fb.prompt]


def to_group(fb: Feedback, where: str, cfg: RMConfig) -> Group:
    """Check a record against the configured criteria and turn it into a training unit."""
    names = [c.name for c in cfg.criteria]
    by_name = {c.name: c for c in cfg.criteria}
    multi = cfg.multi_criteria
    annotator = None if fb.annotator is None else str(fb.annotator)

    def check_criterion(name: str, field_name: str) -> None:
        if name not in by_name:
            raise UserError(f"{where}: field '{field_name}': '{name}' is not a configured criterion "
                            f"({', '.join(names)}); add it under criteria in the config")

    def check_value(value: float, low: float, high: float, field_name: str) -> None:
        if not math.isfinite(value) or not low <= value <= high:
            raise UserError(f"{where}: field '{field_name}': {value} is outside the scale [{low:g}, {high:g}]")
        if cfg.objective.rating_loss == "ordinal" and (value - low) != int(value - low):
            raise UserError(f"{where}: field '{field_name}': the ordinal rating loss needs whole-number "
                            f"levels on [{low:g}, {high:g}] (got {value})")

    if isinstance(fb, Rating):
        targets: list[RatingTarget] = []
        if fb.scores is not None:
            total_w = sum(by_name[n].weight for n in fb.scores if n in by_name) or 1.0
            for name, value in fb.scores.items():
                check_criterion(name, f"scores.{name}")
                c = by_name[name]
                check_value(value, c.scale[0], c.scale[1], f"scores.{name}")
                # One head per criterion learns its own rating; a single head learns the weighted whole.
                column, weight = (names.index(name), 1.0 / len(fb.scores)) if multi else \
                    (COMBINED, c.weight / total_w)
                targets.append(RatingTarget(column, name, value, c.scale[0], c.scale[1], weight))
        else:
            low, high = cfg.score_scale
            check_value(fb.score, low, high, "score")
            targets.append(RatingTarget(COMBINED, "score", fb.score, low, high, 1.0))
        return Group(_prompt(fb), [fb.response], where, ratings=targets, annotator=annotator)

    if fb.criterion is not None:
        check_criterion(fb.criterion, "criterion")
    if isinstance(fb, PreferencePair):
        responses, pairs, margins = [fb.chosen, fb.rejected], [(0, 1)], [fb.margin]
        if fb.margin is not None and not math.isfinite(fb.margin):
            raise UserError(f"{where}: field 'margin': must be a finite number")
    else:
        responses, pairs = list(fb.responses), ranking_pairs(ranking_groups(fb.ranking))
        margins = [None] * len(pairs)
    kept = [(p, m) for p, m in zip(pairs, margins, strict=True) if responses[p[0]] != responses[p[1]]]
    column = names.index(fb.criterion) if multi and fb.criterion is not None else COMBINED
    return Group(_prompt(fb), responses, where, pairs=[p for p, _ in kept], margins=[m for _, m in kept],
                 criterion=fb.criterion, column=column, annotator=annotator,
                 identical_pairs=len(pairs) - len(kept))


def drop_empty_groups(groups: list[Group], report: Counter) -> list[Group]:
    """Pairs with identical texts teach nothing (and would be counted as ties): drop and count them."""
    out = []
    for g in groups:
        report["identical_pairs_dropped"] += g.identical_pairs
        if g.pairs or g.ratings:
            out.append(g)
        else:
            report["groups_without_pairs_dropped"] += 1
    return out


def share_rated_responses(groups: list[Group]) -> list[Group]:
    """A rating of a response that a comparison by the same annotator already holds joins that comparison's
    unit (the host group is extended in place). The feedback app exports each ranking and the ratings of
    the same K responses: kept apart, every response would be encoded and run through the model twice per
    epoch. Each record keeps its share of the loss (the batch's loss units count records); only the
    optional reward-centring penalty, a mean per unit, now averages over the ranking's responses once
    instead of once per rating."""
    hosts: dict[tuple, tuple[Group, int]] = {}
    for g in groups:
        if g.pairs:
            for i, r in enumerate(g.responses):
                hosts.setdefault((g.prompt_key, g.annotator, r), (g, i))
    out = []
    for g in groups:
        host = hosts.get((g.prompt_key, g.annotator, g.responses[0])) if g.ratings and not g.pairs else None
        if host is None:
            out.append(g)
            continue
        unit, i = host
        unit.ratings.extend(replace(t, response=i) for t in g.ratings)
        unit.records += g.records
    return out


# ---------------------------------------------------------------- batching and the objective


def batch_structure(items: list[Encoded], n_heads: int) -> dict:
    """Index tensors describing a batch: which rows form which pairs / ratings, in which unit.

    Rows are the items' sequences in order. A column index picks a head; ``n_heads`` is the
    weighted combination of all heads (rewards_with_combined appends it as the last column).
    """
    win, lose, margin, has_margin, pair_col, pair_group = [], [], [], [], [], []
    r_row, r_col, r_val, r_low, r_high, r_w = [], [], [], [], [], []
    row_group = []
    row = 0
    for gi, it in enumerate(items):
        g = it.group
        col = n_heads if g.column == COMBINED else g.column
        for (a, b), m in zip(g.pairs, g.margins, strict=True):
            win.append(row + a)
            lose.append(row + b)
            margin.append(0.0 if m is None else m)
            has_margin.append(m is not None)
            pair_col.append(col)
            pair_group.append(gi)
        for t in g.ratings:
            r_row.append(row + t.response)
            r_col.append(n_heads if t.column == COMBINED else t.column)
            r_val.append(t.value)
            r_low.append(t.low)
            r_high.append(t.high)
            r_w.append(t.weight)
        row_group.extend([gi] * len(it.seqs))
        row += len(it.seqs)
    long, flt = torch.long, torch.float32
    return {
        "win": torch.tensor(win, dtype=long), "lose": torch.tensor(lose, dtype=long),
        "margin": torch.tensor(margin, dtype=flt), "has_margin": torch.tensor(has_margin, dtype=torch.bool),
        "pair_col": torch.tensor(pair_col, dtype=long), "pair_group": torch.tensor(pair_group, dtype=long),
        "rating_row": torch.tensor(r_row, dtype=long), "rating_col": torch.tensor(r_col, dtype=long),
        "rating_value": torch.tensor(r_val, dtype=flt), "rating_low": torch.tensor(r_low, dtype=flt),
        "rating_high": torch.tensor(r_high, dtype=flt), "rating_weight": torch.tensor(r_w, dtype=flt),
        "row_group": torch.tensor(row_group, dtype=long), "n_groups": len(items),
        "loss_units": sum(it.group.records for it in items),
    }


def common_prefix(seqs: list[list[int]]) -> int:
    """How many leading tokens all of a unit's sequences share, leaving each at least its last token."""
    limit = min(len(s) for s in seqs) - 1
    n = 0
    while n < limit and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def collate(items: list[Encoded], pad_id: int, n_heads: int, share_prefix: bool) -> dict:
    """Every response of every group in one padded batch (chosen and rejected in one forward).

    With ``share_prefix`` (a decoder with SDPA attention, on one process) a unit's sequences share one row
    after one copy of the tokens they all begin with (the prompt, as the reward model's text renders it):
    each sequence's rest attends to that prefix and to itself only, at the positions it has alone, and
    ``last`` marks where each sequence ends, where the score head reads it (response_scores)."""
    batch = batch_structure(items, n_heads)
    if not share_prefix:
        batch["input_ids"], batch["attention_mask"] = right_pad([s for it in items for s in it.seqs], pad_id)
        batch["tokens"] = int(batch["attention_mask"].sum())
        return batch
    prefixes, rests = [], []
    for it in items:
        n = common_prefix(it.seqs)
        # prompt_response_batch repeats the prefix's last token at the head of each rest (harmless here: a
        # decoder's hidden state at a position depends only on what precedes it), so it needs one.
        units = [(it.seqs[0][:n], [s[n:] for s in it.seqs])] if n else [(s[:1], [s[1:]]) for s in it.seqs]
        for prefix, rest in units:
            prefixes.append(prefix)
            rests.append(rest)
    rows = prompt_response_batch(prefixes, rests, pad_id, share_prompt=True)
    batch.update({k: rows[k] for k in ("input_ids", "attention_mask", "position_ids", "last")})
    batch["tokens"] = int(rows["tokens"])
    return batch


def response_scores(model, batch: dict) -> torch.Tensor:
    """Head outputs [rows, num_labels] of a batch: read at each sequence's ``last`` position where the
    batch shares prefixes (collate), else by the model's own pooling (the last non-padding token)."""
    if "last" not in batch:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    parts = body_and_score_head(model)
    if parts is None:
        raise RuntimeError("a batch with shared prefixes needs the model's body and score head apart")
    body, head = parts
    rows, cols = batch["last"].nonzero(as_tuple=True)  # row-major: the order boolean indexing gives
    return head(scored_hidden_states(body, rows, cols, input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]))


def rewards_with_combined(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[N, H] head outputs -> [N, H + 1]: the last column is the weighted reward."""
    return torch.cat([logits, combine_criteria(logits, weights)[:, None]], dim=1)


def objective_sum(cols: torch.Tensor, b: dict, cfg: RMConfig) -> torch.Tensor:
    """The training loss summed over the batch's units (see reward_losses for the pieces)."""
    obj = cfg.objective
    n = b["n_groups"]
    # Zero that stays on the graph: a batch of only ratings under rating_weight=0 must still backward.
    total = cols.sum() * 0.0
    if len(b["win"]):
        delta = cols[b["win"], b["pair_col"]] - cols[b["lose"], b["pair_col"]]
        margin = b["margin"].to(cols) * obj.margin_scale if obj.use_margin else None
        total = total + group_mean_sum(bradley_terry(delta, margin), b["pair_group"], n)
    if len(b["rating_row"]) and obj.rating_weight > 0:
        pred = cols[b["rating_row"], b["rating_col"]]
        low, high, value = b["rating_low"].to(cols), b["rating_high"].to(cols), b["rating_value"].to(cols)
        if obj.rating_loss == "ordinal":
            losses = ordinal_loss(pred, torch.round(value - low).long(), torch.round(high - low).long() + 1,
                                  obj.rating_scale)
        else:
            losses = regression_loss(pred, rating_targets(value, low, high, obj.rating_scale))
        total = total + obj.rating_weight * (losses * b["rating_weight"].to(cols)).sum()
    if obj.centering > 0:
        total = total + obj.centering * group_mean_sum(cols[:, -1] ** 2, b["row_group"], n)
    return total


# ---------------------------------------------------------------- evaluation


def _bucket_accuracy(margins: list[float], correct: list[bool]) -> dict:
    """Accuracy per margin bucket: one bucket per value when there are few, else quartile ranges."""
    if not margins:
        return {}
    values = sorted(set(margins))
    if len(values) <= 6:
        keys = [f"{m:g}" for m in margins]
    else:
        edges = np.quantile(margins, [0.25, 0.5, 0.75]).tolist()
        bounds = [min(margins), *edges, max(margins)]
        names = [f"[{bounds[i]:.3g}, {bounds[i + 1]:.3g}]" for i in range(4)]
        keys = [names[sum(m > e for e in edges)] for m in margins]
    out: dict[str, dict] = {}
    for k, c in zip(keys, correct, strict=True):
        d = out.setdefault(k, {"pairs": 0, "correct": 0})
        d["pairs"] += 1
        d["correct"] += int(c)
    return {k: {"pairs": d["pairs"], "accuracy": d["correct"] / d["pairs"]} for k, d in out.items()}


def expected_calibration_error(deltas: torch.Tensor, bins: int = 10) -> float:
    """ECE of sigmoid(delta r) as the probability that the labelled winner wins: each pair's
    confidence is sigmoid(|delta|) in the side the model picks, compared with how often it is right."""
    if not len(deltas):
        return float("nan")
    conf = torch.sigmoid(deltas.abs())
    correct = (deltas > 0).float()
    idx = ((conf - 0.5) * 2 * bins).long().clamp(max=bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.float().mean().item() * abs(correct[sel].mean().item() - conf[sel].mean().item())
    return ece


def _stats(x: torch.Tensor) -> dict:
    if not len(x):
        return {}
    q = torch.quantile(x, torch.tensor([0.05, 0.5, 0.95]))
    return {"mean": x.mean().item(), "std": x.std(unbiased=False).item(), "min": x.min().item(),
            "p5": q[0].item(), "median": q[1].item(), "p95": q[2].item(), "max": x.max().item()}


def rating_pairs(items: list[Encoded], cfg: RMConfig, row_of: list[int]) -> list[tuple[int, int, int, float, str]]:
    """Pairs implied by ratings of different responses to the same prompt: (better row, worse row,
    column, rating difference, criterion). Per criterion, and for the overall score."""
    names = [c.name for c in cfg.criteria]
    n_heads = len(names) if cfg.multi_criteria else 1
    by_prompt: dict[tuple[str, str], list[tuple[int, float, float]]] = defaultdict(list)
    for i, it in enumerate(items):
        for t in it.group.ratings:
            z = (t.value - t.low) / (t.high - t.low)
            by_prompt[(it.group.prompt_key, t.criterion)].append((row_of[i] + t.response, z, t.value))
    out = []
    for (_, crit), rated in by_prompt.items():
        col = names.index(crit) if cfg.multi_criteria and crit in names else n_heads
        for i in range(len(rated)):
            for j in range(i + 1, len(rated)):
                (ra, za, va), (rb, zb, vb) = rated[i], rated[j]
                if za != zb and ra != rb:
                    hi, lo = ((ra, rb) if za > zb else (rb, ra))
                    out.append((hi, lo, col, abs(va - vb), crit))
    return out


@torch.no_grad()
def evaluate_split(model, items: list[Encoded], cfg: RMConfig, weights: torch.Tensor, pad_id: int,
                   batch_size: int, norm: dict | None = None, detailed: bool = False) -> dict:
    """Loss (the training objective per unit) and pairwise accuracy; with ``detailed``, the full
    report: per-criterion accuracy, accuracy by margin bucket, ECE, reward distributions."""
    n_heads = model.config.num_labels
    seqs = [s for it in items for s in it.seqs]
    # Score each distinct text once (annotators labelling the same item share responses).
    index: dict[tuple[int, ...], int] = {}
    rows = [index.setdefault(tuple(s), len(index)) for s in seqs]
    unique = [list(k) for k in index]
    raw = head_scores(model, unique, pad_id, batch_size)
    cols = rewards_with_combined(raw, weights)[torch.tensor(rows, dtype=torch.long)]
    b = batch_structure(items, n_heads)
    out: dict = {"loss": objective_sum(cols, b, cfg).item() / max(b["loss_units"], 1)}

    delta = cols[b["win"], b["pair_col"]] - cols[b["lose"], b["pair_col"]] if len(b["win"]) else torch.zeros(0)
    group_first_row = []
    row = 0
    for it in items:
        group_first_row.append(row)
        row += len(it.seqs)
    from_ratings = rating_pairs(items, cfg, group_first_row)
    r_delta = torch.tensor([cols[h, c] - cols[lo, c] for h, lo, c, _, _ in from_ratings]) if from_ratings \
        else torch.zeros(0)
    all_delta = torch.cat([delta, r_delta])
    out["pairs"] = len(all_delta)
    out["accuracy"] = (all_delta > 0).float().mean().item() if len(all_delta) else float("nan")
    if len(all_delta):
        out["accuracy_stderr"] = math.sqrt(max(out["accuracy"] * (1 - out["accuracy"]), 1e-12) / len(all_delta))
    if not detailed:
        return out

    out["comparison_pairs"] = len(delta)
    out["rating_pairs"] = len(r_delta)
    # Per criterion: comparisons judged on that criterion, and pairs implied by its ratings.
    pair_crit = [it.group.criterion for it in items for _ in it.group.pairs]
    per: dict[str, list[bool]] = defaultdict(list)
    for c, d in zip(pair_crit, delta.tolist(), strict=True):
        per[c or "overall"].append(d > 0)
    for (_, _, _, _, crit), d in zip(from_ratings, r_delta.tolist(), strict=True):
        per["overall" if crit == "score" else crit].append(d > 0)
    out["per_criterion"] = {c: {"pairs": len(v), "accuracy": sum(v) / len(v)} for c, v in sorted(per.items())}

    margins = [m for m, h in zip(b["margin"].tolist(), b["has_margin"].tolist(), strict=True) if h]
    correct = [d > 0 for d, h in zip(delta.tolist(), b["has_margin"].tolist(), strict=True) if h]
    margins += [m for _, _, _, m, _ in from_ratings]
    correct += [d > 0 for d in r_delta.tolist()]
    out["accuracy_by_margin"] = _bucket_accuracy(margins, correct)
    out["ece"] = expected_calibration_error(all_delta)

    dist = {"raw": _stats(combine_criteria(raw, weights))}
    if norm:
        dist["normalized"] = _stats(combine_criteria(raw, weights, norm["mean"], norm["std"]))
    if len(delta):
        dist["chosen_mean"] = cols[b["win"], -1].mean().item()
        dist["rejected_mean"] = cols[b["lose"], -1].mean().item()
    if n_heads > 1:
        dist["per_head"] = {c.name: _stats(raw[:, i]) for i, c in enumerate(cfg.criteria)}
    out["reward_distribution"] = dist
    return out


def annotator_agreement(groups: list[Group]) -> dict | None:
    """Where several annotators compared the same two responses (same prompt and criterion), how often
    two of them agree: the accuracy a model can hope for on such labels."""
    votes: dict[tuple, dict[str, set[bool]]] = defaultdict(dict)
    for g in groups:
        if g.annotator is None:
            continue
        for a, b in g.pairs:
            x, y = g.responses[a], g.responses[b]
            key = (g.prompt_key, g.criterion, min(x, y), max(x, y))
            votes[key].setdefault(g.annotator, set()).add(x < y)  # True: the smaller text won
    # An annotator who voted both ways on one pair gave no single label: left out of that item.
    agreement = pairwise_agreement([next(iter(v)) for v in by_annotator.values() if len(v) == 1]
                                   for by_annotator in votes.values())
    if not agreement.pairs:
        return None
    annotators = {a for v in votes.values() for a in v}
    return {"items": agreement.items, "annotators": len(annotators), "annotator_pairs": agreement.pairs,
            "pairwise_agreement": agreement.rate}


# ---------------------------------------------------------------- the stage


def encode_groups(groups: list[Group], tokenizer, max_len: int, stats: Counter) -> list[Encoded]:
    """Every group's responses as reward-model inputs (see encode_for_reward); counts truncated sequences."""
    out = []
    for g in groups:
        seqs = []
        for r in g.responses:
            ids, cut = encode_for_reward(tokenizer, g.prompt, r, max_len)
            stats["sequences_truncated"] += cut
            seqs.append(ids)
        out.append(Encoded(g, seqs))
    return out


def normalization_stats(model, items: list[Encoded], weights: torch.Tensor, pad_id: int, batch_size: int,
                        max_samples: int, seed: int) -> dict:
    """Mean and std of the reward over the distinct training responses (a seeded sample of them)."""
    unique = list({tuple(s): None for it in items for s in it.seqs})
    if len(unique) > max_samples:
        unique = random.Random(seed).sample(unique, max_samples)
    reward = combine_criteria(head_scores(model, [list(s) for s in unique], pad_id, batch_size), weights)
    std = reward.std(unbiased=False).item()
    return {"mean": reward.mean().item(), "std": std if std > 1e-8 else 1.0, "samples": len(unique)}


def run_rm(cfg: RMConfig, overwrite: bool = False) -> Path:
    run = RunDir(cfg.output_dir)
    names = [c.name for c in cfg.criteria]
    n_heads = len(names) if cfg.multi_criteria else 1
    weights = torch.tensor([c.weight for c in cfg.criteria]) if cfg.multi_criteria else torch.ones(1)
    weights = weights / weights.sum()

    def parse(rec: Record) -> Group:
        return to_group(parse_feedback(rec), rec.where, cfg)

    # One prompt's ranking and the ratings of its responses stay on one side of the split.
    splits, data_report = load_splits(cfg.data, cfg.train.seed, parse, group=lambda g: g.prompt_key)
    drops: Counter = Counter()
    splits = {k: drop_empty_groups(v, drops) for k, v in splits.items()}
    data_report["dropped"] = dict(drops)
    if not splits["train"]:
        raise UserError(f"{cfg.data.train}: no training comparisons or ratings left after dropping identical pairs")
    data_report["groups"] = {k: len(v) for k, v in splits.items()}
    data_report["pairs"] = {k: sum(len(g.pairs) for g in v) for k, v in splits.items()}
    data_report["ratings"] = {k: sum(bool(g.ratings) for g in v) for k, v in splits.items()}
    splits = {k: share_rated_responses(v) for k, v in splits.items()}
    data_report["units"] = {k: len(v) for k, v in splits.items()}

    acc = make_accelerator(cfg.train, run, matmul_parameters=planned_matmul_parameters(
        cfg.model, AutoModelForSequenceClassification, {"num_labels": n_heads}))
    open_run(run, cfg, overwrite, SUPERVISED_MUTABLE, acc.is_main_process)
    set_seed(cfg.train.seed)  # the new reward head is initialised randomly: same seed, same head
    model, tokenizer = load_pretrained(cfg.model, auto_cls=AutoModelForSequenceClassification, device=acc.device,
                                       for_training=True, config_overrides={"num_labels": n_heads})
    if model.config.num_labels != n_heads:
        raise UserError(f"{cfg.model.name_or_path} has {model.config.num_labels} reward heads but the config asks "
                        f"for {n_heads} (multi_criteria={cfg.multi_criteria}, {len(names)} criteria)")
    ensure_chat_template(tokenizer, cfg.data.chat_template)
    # LoRA trains the new head in full; an encoder's pooler (often absent from sentence-embedding
    # checkpoints, so freshly initialised) too.
    heads = ["score"] if hasattr(model, "score") else ["classifier"]
    if getattr(getattr(model, model.base_model_prefix, None), "pooler", None) is not None:
        heads.append("pooler")
    model = prepare_for_training(model, cfg.model, task_type="SEQ_CLS", modules_to_save=heads)
    max_len = model_max_len(model, cfg.data.max_seq_len)
    pad_id = tokenizer.pad_token_id

    stats: Counter = Counter()
    train = encode_groups(splits["train"], tokenizer, max_len, stats)
    val = encode_groups(splits["validation"], tokenizer, max_len, stats)
    test = encode_groups(splits["test"], tokenizer, max_len, stats)
    data_report["truncation"] = {**stats, "max_seq_len": max_len}

    if acc.is_main_process:
        atomic_write_json(run.root / "data_report.json", data_report)
    params = count_parameters(model)
    log.info("model: %s parameters, %s trainable; %d training units", f"{params['total']:,}",
             f"{params['trainable']:,}", len(train))

    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size * 2

    # One process only: DDP and FSDP run the whole forward, whose pooling reads one score per row.
    share = shares_prompt(model) and body_and_score_head(model) is not None and acc.num_processes == 1

    def loss_fn(m, batch):
        logits = response_scores(m, batch).float()
        return objective_sum(rewards_with_combined(logits, weights), batch, cfg), batch["loss_units"], {}

    def evaluate(m) -> dict[str, float]:
        r = evaluate_split(m, val, cfg, weights, pad_id, eval_bs)
        return {"eval_loss": r["loss"], "eval_accuracy": r["accuracy"]}

    result = fit(model, train, lambda b: collate(b, pad_id, n_heads, share), loss_fn, cfg.train, run,
                 evaluate=evaluate if val else None,
                 lengths=[len(e) for e in train] if cfg.train.group_by_length else None, accelerator=acc,
                 tracker_config=cfg.model_dump(mode="json"), description="rm")

    norm: dict = {}  # the final model's reward statistics: in eval.json and in the saved model's meta

    def final_eval(final) -> dict:
        norm.update(normalization_stats(final, train, weights, pad_id, eval_bs, cfg.normalization_samples,
                                        cfg.train.seed))
        evaluation: dict = {"steps": result.state.step, "stopped_early": result.state.stopped_early,
                            "best_step": result.state.best_step, "parameters": params, "normalization": norm}
        for name, items in (("validation", val), ("test", test)):
            if items:
                evaluation[name] = evaluate_split(final, items, cfg, weights, pad_id, eval_bs, norm, detailed=True)
        agreement = annotator_agreement([g for v in splits.values() for g in v])
        if agreement:
            evaluation["annotator_agreement"] = agreement
        return evaluation

    def save(final, state_dict: dict | None) -> None:
        # LoRA runs are saved merged: model/ is always a plain sequence-classification model.
        to_save = final.merge_and_unload() if isinstance(final, PeftModel) else final
        save_model(to_save, tokenizer, run.model_dir, meta={
            "stage": "rm", "base_model": cfg.model.name_or_path, "adapter": cfg.model.adapter,
            "criteria": names if cfg.multi_criteria else ["reward"],
            "criteria_weights": weights.tolist(),
            "criteria_config": [c.model_dump(mode="json") for c in cfg.criteria],
            "multi_criteria": cfg.multi_criteria,
            "normalization": {"mean": norm["mean"], "std": norm["std"]},
            "format": "format_for_reward: chat prompts through the chat template with the response as the "
                      "assistant turn; plain prompts as prompt + response + EOS",
            "max_seq_len": max_len,
        }, state_dict=state_dict)

    return finish_run(acc, run, model, final_eval, save, {"stage": "rm"})
