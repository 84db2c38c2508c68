"""Direct preference optimisation from human feedback, top to bottom.

read + validate feedback (pairs, HH-RLHF dialogues, rankings, ratings, KTO's unpaired examples) -> split by
prompt -> units -> load the policy (and the reference: a frozen copy, or with LoRA the base with the
adapter switched off; none for SimPO / ORPO) -> tokenize -> reference log-probs (live, or one cached pass)
-> fit -> held-out evaluation into eval.json -> save model/ -> FINISHED.

A training unit is one prompt's comparisons: a preference pair, a whole ranking (its C(K, 2) pairs, each
response encoded once) or the rated responses of one prompt (pairs from rating differences); its loss is
the mean over its pairs, as the reward model's K-wise loss. For KTO a unit is one desirable or undesirable
example. Sequence log-probabilities count response tokens only (the EOS that ends a response included),
never the prompt or padding.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from alignloop.config import DPOConfig, RMConfig
from alignloop.data.batching import Rows, prompt_response_batch
from alignloop.data.formats import UnpairedExample, parse_feedback, validate_record
from alignloop.data.io import Record
from alignloop.data.splits import load_splits
from alignloop.data.tokenize import encode_prompt, end_of_turn_id, ensure_chat_template
from alignloop.errors import UserError
from alignloop.generation.rollout import scatter_response
from alignloop.models.forward import selected_next_token_logits, shares_prompt
from alignloop.models.load import (
    count_parameters,
    load_pretrained,
    planned_matmul_parameters,
    prepare_for_training,
    save_model,
)
from alignloop.models.token_logprobs import token_logprobs
from alignloop.runs import RunDir, atomic_write_json, read_metrics
from alignloop.train import dpo_losses as dl
from alignloop.train.reward import Group, to_group
from alignloop.train.reward_losses import group_mean_sum
from alignloop.training.accelerator import make_accelerator
from alignloop.training.distributed import mean_over_processes
from alignloop.training.finish import finish_run
from alignloop.training.fit import fit
from alignloop.training.resume import SUPERVISED_MUTABLE, open_run

log = logging.getLogger(__name__)

PAIR_METRICS = ("reward_chosen", "reward_rejected", "reward_accuracy", "reward_margin", "logp_chosen",
                "logp_rejected")
KTO_METRICS = ("kl", "reward_desirable", "reward_undesirable", "logp_desirable", "logp_undesirable",
               "desirable", "undesirable")
REFERENCE_CHUNK = 256  # units per cached file of reference log-probs (a killed pass resumes at a chunk)


# ---------------------------------------------------------------- records -> units


@dataclass
class Unit:
    """One prompt's responses and what is known about them: (chosen, rejected) index pairs for the
    pairwise losses, a desirable / undesirable label per response for KTO (None: no KTO example)."""

    prompt: str | list[dict]
    responses: list[str]
    where: str
    pairs: list[tuple[int, int]] = field(default_factory=list)
    desirable: list[bool | None] = field(default_factory=list)

    @property
    def prompt_key(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else json.dumps(self.prompt, sort_keys=True)


def criteria_settings(cfg: DPOConfig) -> RMConfig:
    """The reward-model settings ``to_group`` checks ratings against (criteria and scales; one overall head)."""
    return RMConfig.model_construct(criteria=cfg.criteria, score_scale=cfg.score_scale, multi_criteria=False)


def parse_record(rec: Record, rm_settings: RMConfig) -> Group | Unit:
    """A feedback record as ``alignloop rm`` reads it (a Group), or KTO's unpaired example (a Unit)."""
    if "label" in rec.data and "completion" in rec.data:
        ex = validate_record(UnpairedExample, rec)
        prompt = ex.prompt if isinstance(ex.prompt, str) else [m.model_dump() for m in ex.prompt]
        return Unit(prompt, [ex.completion], rec.where, desirable=[ex.label])
    return to_group(parse_feedback(rec), rec.where, rm_settings)


def overall_rating(g: Group) -> float:
    """A rating record's overall value on [0, 1]: its criteria's normalised values, weighted as configured."""
    return sum(t.weight * (t.value - t.low) / (t.high - t.low) for t in g.ratings)


def best_vs_rest(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Only the pairs whose better response is among the best (those that lose no comparison)."""
    losers = {b for _, b in pairs}
    return [(a, b) for a, b in pairs if a not in losers]


def mean_ratings(groups: list[Group]) -> list[tuple[Group, dict[str, float]]]:
    """Per prompt (its first rating record, then each rated response's overall rating): several ratings of
    one response count as their mean."""
    by_prompt: dict[str, tuple[Group, dict[str, list[float]]]] = {}
    for g in groups:
        _, values = by_prompt.setdefault(g.prompt_key, (g, {}))
        values.setdefault(g.responses[0], []).append(overall_rating(g))
    return [(g, {r: sum(v) / len(v) for r, v in values.items()}) for g, values in by_prompt.values()]


def pair_units(parsed: list[Group | Unit], cfg: DPOConfig) -> list[Unit]:
    """Units for the pairwise losses. The ratings of one prompt's responses form one unit with a pair for
    every two responses whose overall ratings differ by more than ``dpo.rating_margin``."""
    s = cfg.dpo
    units: list[Unit] = []
    rated: list[Group] = []
    for item in parsed:
        if isinstance(item, Unit):
            raise UserError(f"{item.where}: an unpaired example ('label') trains only with dpo.loss=kto; "
                            f"dpo.loss={s.loss} needs pairs, rankings or ratings")
        if item.ratings:
            rated.append(item)
        elif item.pairs:
            pairs = best_vs_rest(item.pairs) if s.ranking_pairs == "best_vs_rest" else item.pairs
            units.append(Unit(item.prompt, item.responses, item.where, pairs=pairs))
    for first, by_response in mean_ratings(rated):
        responses, value = list(by_response), list(by_response.values())
        pairs = [(i, j) if value[i] > value[j] else (j, i) for i in range(len(responses))
                 for j in range(i + 1, len(responses)) if abs(value[i] - value[j]) > s.rating_margin]
        if pairs:
            units.append(Unit(first.prompt, responses, first.where, pairs=pairs))
    return units


def kto_units(parsed: list[Group | Unit], cfg: DPOConfig) -> list[Unit]:
    """One unit per KTO example: unpaired records as labelled; of a pair or ranking the responses that lose
    no comparison are desirable and those that win none undesirable (reviewers' approve / flag decisions
    arrive as such pairs); a response whose mean rating is above ``dpo.kto_threshold`` is desirable, below
    it undesirable. The same
    response with the same label for the same prompt is one example."""
    seen: set[tuple[str, str, bool]] = set()
    units: list[Unit] = []

    def add(g: Group | Unit, response: str, desirable: bool) -> None:
        key = (g.prompt_key, response, desirable)
        if key not in seen:
            seen.add(key)
            units.append(Unit(g.prompt, [response], g.where, desirable=[desirable]))

    rated: list[Group] = []
    for item in parsed:
        if isinstance(item, Unit):
            add(item, item.responses[0], bool(item.desirable[0]))
        elif item.ratings:
            rated.append(item)
        else:
            winners, losers = {a for a, _ in item.pairs}, {b for _, b in item.pairs}
            for i in sorted(winners - losers):
                add(item, item.responses[i], True)
            for i in sorted(losers - winners):
                add(item, item.responses[i], False)
    for first, by_response in mean_ratings(rated):
        for response, value in by_response.items():
            if value != cfg.dpo.kto_threshold:
                add(first, response, value > cfg.dpo.kto_threshold)
    return units


# ---------------------------------------------------------------- tokens


@dataclass
class Encoded:
    unit: Unit
    prompt_ids: list[int]
    response_ids: list[list[int]]
    # KTO: the responses of another unit after this unit's prompt, for the KL reference point.
    kl_response_ids: list[list[int]] = field(default_factory=list)
    reference: list[float] | None = None  # precomputed reference log-probs of response_ids
    reference_kl: list[float] | None = None

    def __len__(self) -> int:
        return sum(len(self.prompt_ids) + len(r) for r in self.response_ids + self.kl_response_ids)


def encode_response(tokenizer, response: str, end_id: int, room: int, stats: Counter) -> list[int]:
    """The response's tokens and the token that ends it, cut to ``room`` tokens."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [end_id]
    if len(ids) > room:
        stats["responses_truncated"] += 1
        ids = ids[:room]
    return ids


def encode_units(units: list[Unit], tokenizer, cfg: DPOConfig, stats: Counter, kto: bool) -> list[Encoded]:
    # As SFT trains them: a completion of a text prompt ends with EOS, an answer to a chat prompt with the
    # template's end-of-turn token (EOS where the template closes turns with it or with plain text).
    turn_end = end_of_turn_id(tokenizer)
    chat_end = tokenizer.eos_token_id if turn_end is None else turn_end
    out = []
    for u in units:
        prompt_ids = encode_prompt(tokenizer, u.prompt, cfg.data.max_prompt_len)
        if not prompt_ids:  # nothing for the response's first token to be predicted from
            raise UserError(f"{u.where}: field 'prompt': empty (no tokens, and the tokenizer adds no BOS); DPO "
                            "scores each response given its prompt, so every record needs a non-empty one")
        room = cfg.data.max_seq_len - len(prompt_ids)
        end_id = chat_end if isinstance(u.prompt, list) else tokenizer.eos_token_id
        responses = [encode_response(tokenizer, r, end_id, room, stats) for r in u.responses]
        out.append(Encoded(u, prompt_ids, responses))
    if kto and len(out) > 1:
        # The KL estimate needs responses that do not answer the prompt: each unit borrows the next unit's
        # (a fixed pairing, so the reference's share can be computed once before training).
        for i, e in enumerate(out):
            other = out[(i + 1) % len(out)]
            room = cfg.data.max_seq_len - len(e.prompt_ids)
            e.kl_response_ids = [r[:room] for r in other.response_ids]
    elif kto:  # a single example has no other response to pair its prompt with: its own stands in
        out[0].kl_response_ids = [list(r) for r in out[0].response_ids]
    return out


# ---------------------------------------------------------------- sequence log-probabilities


def sequence_logprobs(model: nn.Module, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(response | prompt) summed over response tokens [n], response token counts [n]) of the rows'
    n responses, in prompt_response_batch's order: the LM head runs at response positions only, so prompt and
    padding never count."""
    select, response_mask = rows["select"], rows["response_mask"]
    logits = selected_next_token_logits(model, rows["input_ids"], select, rows["attention_mask"],
                                        rows["position_ids"])
    logp = token_logprobs(logits, rows["input_ids"][:, 1:][select])
    return scatter_response(logp, response_mask).sum(1), response_mask.sum(1).to(torch.float32)


def collate(items: list[Encoded], pad_id: int, share_prompt: bool) -> dict:
    """Every response of every unit in one batch (chosen and rejected in one forward; with ``share_prompt``
    a unit's prompt encoded once), with index tensors saying which responses form which pairs in which unit,
    and the KTO responses and labels."""
    chosen, rejected, pair_unit, desirable, labelled, reference, reference_kl = [], [], [], [], [], [], []
    row = 0
    for ui, e in enumerate(items):
        for a, b in e.unit.pairs:
            chosen.append(row + a)
            rejected.append(row + b)
            pair_unit.append(ui)
        for i, d in enumerate(e.unit.desirable):
            if d is not None:
                labelled.append(row + i)
                desirable.append(d)
        row += len(e.response_ids)
        if e.reference is not None:
            reference.extend(e.reference)
            reference_kl.extend(e.reference_kl or [])
    prompts = [e.prompt_ids for e in items]
    rows = prompt_response_batch(prompts, [e.response_ids for e in items], pad_id, share_prompt)
    long = torch.long
    batch = {**rows, "chosen": torch.tensor(chosen, dtype=long),
             "rejected": torch.tensor(rejected, dtype=long), "pair_unit": torch.tensor(pair_unit, dtype=long),
             "labelled": torch.tensor(labelled, dtype=long), "desirable": torch.tensor(desirable, dtype=torch.bool),
             "n_units": len(items), "loss_units": len(items) if chosen else len(labelled),
             "tokens": int(rows.pop("tokens"))}
    if items[0].kl_response_ids:
        kl_rows = prompt_response_batch(prompts, [e.kl_response_ids for e in items], pad_id, share_prompt)
        batch.update({f"kl_{k}": v for k, v in kl_rows.items() if k != "tokens"})
    if reference:
        batch["reference"] = torch.tensor(reference, dtype=torch.float32)
    if reference_kl:
        batch["reference_kl"] = torch.tensor(reference_kl, dtype=torch.float32)
    return batch


ROW_KEYS = ("input_ids", "attention_mask", "position_ids", "select", "response_mask")


def batch_rows(batch: dict, prefix: str = "") -> Rows:
    """The batch's responses (``prefix`` "kl_": KTO's mismatched ones) as prompt_response_batch lays them out."""
    return {k: batch[prefix + k] for k in ROW_KEYS}


# ---------------------------------------------------------------- the objective


ReferenceFn = Callable[[nn.Module, Rows], torch.Tensor]


def objective(model: nn.Module, batch: dict, cfg: DPOConfig, reference: ReferenceFn | None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss summed over the batch's units, metric sums over units) for the configured loss.

    ``reference(model, rows)`` gives live reference log-probs; without it they come from the batch
    (precomputed) or, for SimPO / ORPO, are not needed."""
    s = cfg.dpo
    logp, ntok = sequence_logprobs(model, batch_rows(batch))

    def reference_logps(key: str, rows: Rows) -> torch.Tensor:
        if key in batch:
            return batch[key].to(logp)
        with torch.no_grad():
            return reference(model, rows).to(logp)

    if s.loss == "kto":
        rows, desirable = batch["labelled"], batch["desirable"]
        ref = reference_logps("reference", batch_rows(batch))
        kl_rows = batch_rows(batch, "kl_")
        with torch.no_grad():  # z0 over the global batch: every process's KL rows
            z0 = dl.kto_reference_point(sequence_logprobs(model, kl_rows)[0], reference_logps("reference_kl", kl_rows),
                                        mean_over_processes)
        logratio = (logp - ref)[rows]
        losses = dl.kto_loss(logratio, desirable, z0, s.beta, s.desirable_weight, s.undesirable_weight)
        reward = (s.beta * logratio).detach()
        d, u = desirable, ~desirable
        metrics = {"kl": z0 * len(rows), "reward_desirable": reward[d].sum(), "reward_undesirable": reward[u].sum(),
                   "logp_desirable": logp[rows][d].detach().sum(), "logp_undesirable": logp[rows][u].detach().sum(),
                   "desirable": d.sum(), "undesirable": u.sum()}
        return losses.sum(), metrics

    c, j = batch["chosen"], batch["rejected"]
    if s.loss in dl.REFERENCE_FREE:
        ref_c = ref_j = None
        rewards = (s.beta * logp / ntok).detach()  # SimPO's reward: beta times the per-token mean log-prob
    else:
        ref = reference_logps("reference", batch_rows(batch))
        ref_c, ref_j = ref[c], ref[j]
        rewards = dl.implicit_reward(logp, ref, s.beta).detach()
    losses = dl.pair_loss(s.loss, logp[c], logp[j], ref_c, ref_j, ntok[c], ntok[j], s.beta, s.label_smoothing,
                          s.gamma)
    if s.sft_weight > 0:
        losses = losses + s.sft_weight * dl.sft_loss(logp[c] / ntok[c])
    unit, n = batch["pair_unit"], batch["n_units"]
    margin = rewards[c] - rewards[j]
    per_pair = {"reward_chosen": rewards[c], "reward_rejected": rewards[j],
                # a tie counts half: before training (policy = reference) accuracy is 0.5, not 0
                "reward_accuracy": (margin > 0).float() + 0.5 * (margin == 0).float(),
                "reward_margin": margin, "logp_chosen": logp[c].detach(), "logp_rejected": logp[j].detach()}
    metrics = {k: group_mean_sum(v, unit, n) for k, v in per_pair.items()}
    return group_mean_sum(losses, unit, n), metrics


def step_metrics(metrics: dict[str, torch.Tensor], units: int, kto: bool) -> dict[str, float]:
    """The metric sums of one micro-batch as ``fit`` logs them (it divides by the step's units). KTO's class
    means are the micro-batch's, weighted by its examples; a class absent from a micro-batch adds nothing."""
    if not kto:
        return {k: float(v) for k, v in metrics.items()}
    out = {"kl": float(metrics["kl"]), "desirable_share": float(metrics["desirable"])}
    for name in ("desirable", "undesirable"):
        n = float(metrics[name])
        if n:
            out[f"reward_{name}"] = float(metrics[f"reward_{name}"]) / n * units
            out[f"logp_{name}"] = float(metrics[f"logp_{name}"]) / n * units
    return out


def evaluate_units(model: nn.Module, items: list[Encoded], cfg: DPOConfig, reference: ReferenceFn | None,
                   pad_id: int, batch_size: int, device: torch.device, share_prompt: bool
                   ) -> dict[str, float]:
    """The objective and its metrics over held-out units: pairwise losses report means per unit (as the
    training log does); KTO reports desirable and undesirable means and their margins."""
    totals: Counter = Counter()
    units = 0
    for i in range(0, len(items), batch_size):
        batch = collate(items[i : i + batch_size], pad_id, share_prompt)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss, metrics = objective(model, batch, cfg, reference)
        totals["loss"] += loss.item()
        for k, v in metrics.items():
            totals[k] += float(v)
        units += batch["loss_units"]
    out = {"units": units, "loss": totals["loss"] / max(units, 1)}
    if cfg.dpo.loss != "kto":
        out.update({k: totals[k] / max(units, 1) for k in PAIR_METRICS})
        return out
    nd, nu = max(totals["desirable"], 1), max(totals["undesirable"], 1)
    out.update(desirable=int(totals["desirable"]), undesirable=int(totals["undesirable"]),
               kl=totals["kl"] / max(units, 1), reward_desirable=totals["reward_desirable"] / nd,
               reward_undesirable=totals["reward_undesirable"] / nu, logp_desirable=totals["logp_desirable"] / nd,
               logp_undesirable=totals["logp_undesirable"] / nu)
    out["reward_margin"] = out["reward_desirable"] - out["reward_undesirable"]
    out["logp_margin"] = out["logp_desirable"] - out["logp_undesirable"]
    return out


# ---------------------------------------------------------------- the reference


def load_policy_and_reference(cfg: DPOConfig, device: torch.device) -> tuple[nn.Module, nn.Module | None, object]:
    """(policy, reference, tokenizer), dropout off in both (TRL's default too: the same input must give the
    same log-probs in policy and reference). The reference is a frozen copy of the starting policy; a fresh
    LoRA policy has none (the base with the adapter disabled is the starting policy); a policy continuing
    an adapter run gets a frozen copy with that adapter merged; SimPO and ORPO need none."""
    model_cfg = cfg.model.model_copy(update={"dropout": 0.0,
                                             "lora": cfg.model.lora.model_copy(update={"dropout": 0.0})})
    policy, tok = load_pretrained(model_cfg, device=device, for_training=True)
    ensure_chat_template(tok, cfg.data.chat_template)
    ref = None
    if cfg.dpo.loss not in dl.REFERENCE_FREE:
        if hasattr(policy, "disable_adapter"):
            ref = copy.deepcopy(policy).merge_and_unload()
        elif cfg.model.adapter == "none":
            ref = copy.deepcopy(policy)
        if ref is not None:
            ref.eval()
            ref.requires_grad_(False)
    return prepare_for_training(policy, model_cfg), ref, tok


def fingerprint(items: list[Encoded]) -> str:
    h = hashlib.sha256()
    for e in items:
        h.update(json.dumps([e.prompt_ids, e.response_ids, e.kl_response_ids]).encode())
    return h.hexdigest()


def precompute_reference(items: list[Encoded], name: str, folder: Path, reference: ReferenceFn, model: nn.Module,
                         acc, pad_id: int, batch_size: int, share_prompt: bool) -> None:
    """Reference log-probs of every response (and KTO's KL responses), one pass, cached in ``folder`` in
    chunks of REFERENCE_CHUNK units: a resumed run (or a pass killed half-way) reads what is there."""
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(items), REFERENCE_CHUNK):
        chunk = items[start : start + REFERENCE_CHUNK]
        path = folder / f"{name}-{start // REFERENCE_CHUNK:05d}.safetensors"
        key = fingerprint(chunk)
        if acc.is_main_process and not (path.is_file() and _cached_key(path) == key):
            logps, kl = [], []
            for i in range(0, len(chunk), batch_size):
                part = chunk[i : i + batch_size]
                prompts = [e.prompt_ids for e in part]
                rows = prompt_response_batch(prompts, [e.response_ids for e in part], pad_id, share_prompt)
                with torch.no_grad(), acc.autocast():
                    logps.append(reference(model, _to(rows, acc.device)).float().cpu())
                    if part[0].kl_response_ids:
                        kl_rows = prompt_response_batch(prompts, [e.kl_response_ids for e in part], pad_id,
                                                        share_prompt)
                        kl.append(reference(model, _to(kl_rows, acc.device)).float().cpu())
            tensors = {"logps": torch.cat(logps)}
            if kl:
                tensors["kl"] = torch.cat(kl)
            tmp = path.with_suffix(".tmp")
            save_file(tensors, tmp, metadata={"fingerprint": key})
            tmp.replace(path)
        acc.wait_for_everyone()
        saved = load_file(path)
        logps, kl = saved["logps"].tolist(), saved["kl"].tolist() if "kl" in saved else []
        for e in chunk:
            e.reference, logps = logps[: len(e.response_ids)], logps[len(e.response_ids):]
            if e.kl_response_ids:
                e.reference_kl, kl = kl[: len(e.kl_response_ids)], kl[len(e.kl_response_ids):]


def _cached_key(path: Path) -> str | None:
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("fingerprint")


def _to(rows: Rows, device: torch.device) -> Rows:
    return {k: v.to(device) for k, v in rows.items() if k in ROW_KEYS}


# ---------------------------------------------------------------- the stage


def run_dpo(cfg: DPOConfig, overwrite: bool = False) -> Path:
    s = cfg.dpo
    kto = s.loss == "kto"
    run = RunDir(cfg.output_dir)
    rm_settings = criteria_settings(cfg)
    # One prompt's comparisons stay on one side of the split.
    splits, data_report = load_splits(cfg.data, cfg.train.seed, lambda rec: parse_record(rec, rm_settings),
                                      group=lambda g: g.prompt_key)
    to_units = kto_units if kto else pair_units
    units = {k: to_units(v, cfg) for k, v in splits.items()}
    if not units["train"]:
        raise UserError(f"{cfg.data.train}: no training {'examples' if kto else 'pairs'} for dpo.loss={s.loss}")
    data_report["units"] = {k: len(v) for k, v in units.items()}
    if kto:
        data_report["desirable"] = {k: sum(bool(u.desirable[0]) for u in v) for k, v in units.items()}
    else:
        data_report["pairs"] = {k: sum(len(u.pairs) for u in v) for k, v in units.items()}

    acc = make_accelerator(cfg.train, run, matmul_parameters=planned_matmul_parameters(cfg.model))
    open_run(run, cfg, overwrite, SUPERVISED_MUTABLE, acc.is_main_process)
    torch.manual_seed(cfg.train.seed)  # before the model is built: a LoRA adapter is initialised randomly
    policy, ref, tok = load_policy_and_reference(cfg, acc.device)
    pad_id = tok.pad_token_id
    share = shares_prompt(policy)  # a prompt's responses in one row, the prompt encoded once
    stats: Counter = Counter()
    train, val, test = (encode_units(units[k], tok, cfg, stats, kto) if units[k] else []
                        for k in ("train", "validation", "test"))
    data_report["truncation"] = {**stats, "max_seq_len": cfg.data.max_seq_len,
                                 "max_prompt_len": cfg.data.max_prompt_len}
    if acc.is_main_process:
        atomic_write_json(run.root / "data_report.json", data_report)
    params = count_parameters(policy)
    log.info("policy: %s parameters, %s trainable; %d training units (%s loss, %s reference)",
             f"{params['total']:,}", f"{params['trainable']:,}", len(train), s.loss,
             "no" if s.loss in dl.REFERENCE_FREE else s.reference)

    def reference_logps(model: nn.Module, rows: Rows) -> torch.Tensor:
        if ref is not None:
            return sequence_logprobs(ref, rows)[0]
        with acc.unwrap_model(model).disable_adapter():
            return sequence_logprobs(model, rows)[0]

    eval_bs = cfg.train.eval_batch_size or cfg.train.batch_size
    live: ReferenceFn | None = None
    if s.loss not in dl.REFERENCE_FREE:
        if s.reference == "precompute":
            for name, items in (("train", train), ("validation", val), ("test", test)):
                precompute_reference(items, name, run.root / "reference", reference_logps, policy, acc, pad_id,
                                     eval_bs, share)
            ref = None  # the cached log-probs replace it: no second model in memory while training
        else:
            live = reference_logps

    def loss_fn(m, batch):
        loss, metrics = objective(m, batch, cfg, live)
        return loss, batch["loss_units"], step_metrics(metrics, batch["loss_units"], kto)

    def evaluate(m) -> dict[str, float]:
        r = evaluate_units(m, val, cfg, live, pad_id, eval_bs, acc.device, share)
        return {f"eval_{k}": v for k, v in r.items() if k != "units"}

    result = fit(policy, train, lambda b: collate(b, pad_id, share), loss_fn, cfg.train, run,
                 evaluate=evaluate if val else None,
                 lengths=[len(e) for e in train] if cfg.train.group_by_length else None, accelerator=acc,
                 tracker_config=cfg.model_dump(mode="json"), description="dpo")

    def final_eval(final) -> dict:
        evaluation: dict = {"loss": s.loss, "steps": result.state.step, "stopped_early": result.state.stopped_early,
                            "best_step": result.state.best_step, "parameters": params}
        before = next((r for r in read_metrics(run.metrics_path) if r.get("step") == 0 and "eval_loss" in r), None)
        if before is not None:  # the untrained policy on the validation units (fit's step-0 evaluation)
            evaluation["validation_before"] = {k.removeprefix("eval_"): v for k, v in before.items()
                                               if k.startswith("eval_")}
        for name, items in (("validation", val), ("test", test)):
            if items:
                evaluation[name] = evaluate_units(final, items, cfg, live, pad_id, eval_bs, acc.device, share)
        return evaluation

    def save(final, state_dict: dict | None) -> None:
        save_model(final, tok, run.model_dir, meta={"stage": "dpo", "loss": s.loss, "beta": s.beta,
                                                    "base_model": cfg.model.name_or_path,
                                                    "adapter": cfg.model.adapter}, state_dict=state_dict)

    return finish_run(acc, run, policy, final_eval, save, {"stage": "dpo", "loss": s.loss})
