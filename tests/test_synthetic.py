"""The demo world: gold scores behave as documented, annotators agree as their noise says, and
everything is a pure function of the seed."""

from __future__ import annotations

import random
import re
import statistics

import pytest
from scipy.stats import kendalltau

from alignloop.data import synthetic as S

PROMPT = "Describe the red fox that sings in the forest."
GOOD = ("The clever red fox sings in the forest. It has bright eyes and a fluffy tail. "
        "Every morning it eats berries by the old oak. Its friend is a kind baker, who finds it gentle and kind.")


def test_prompt_entities_are_parsed_by_category():
    assert S.requested_entities(PROMPT) == {"colour": "red", "animal": "fox", "action": "sing", "place": "forest"}
    assert S.requested_entities("Describe a owl that loves swimming.") == {"animal": "owl", "action": "swim"}


def test_a_good_answer_scores_high_on_every_criterion():
    g = S.gold_scores(PROMPT, GOOD)
    assert g["relevance"] == 1.0 and g["consistency"] == 1.0
    assert g["creativity"] > 0.7
    assert S.gold_total(PROMPT, GOOD) == pytest.approx(sum(S.GOLD_WEIGHTS[c] * g[c] for c in S.CRITERIA))
    assert S.gold_breakdown(PROMPT, GOOD)["total"] == pytest.approx(S.gold_total(PROMPT, GOOD))
    assert S.gold_ratings(PROMPT, GOOD)["relevance"] == pytest.approx(7.0)


def test_relevance_counts_requested_entities_and_penalises_other_animals():
    missing_place = GOOD.replace(" in the forest", "")
    assert S.gold_scores(PROMPT, missing_place)["relevance"] == pytest.approx(0.75)
    sung = GOOD.replace("sings", "was singing")  # any form of the action counts
    assert S.gold_scores(PROMPT, sung)["relevance"] == 1.0
    intruder = GOOD + " A wolf visits it sometimes."
    assert S.gold_scores(PROMPT, intruder)["relevance"] == pytest.approx(0.8)


def test_consistency_drops_for_conflicts_repeats_and_stutters():
    assert S.gold_scores(PROMPT, GOOD + " The fox is blue.")["consistency"] == pytest.approx(0.75)
    assert S.gold_scores(PROMPT, GOOD + " It lives in the castle.")["consistency"] == pytest.approx(0.75)
    first = GOOD.split(". ")[0] + "."
    assert S.gold_scores(PROMPT, GOOD + " " + first)["consistency"] == pytest.approx(0.8)
    assert S.gold_scores(PROMPT, GOOD.replace("bright", "bright bright"))["consistency"] == pytest.approx(0.9)
    assert S.gold_scores(PROMPT, "red fox")["consistency"] == pytest.approx(2 / 8)  # too short to count


def test_creativity_has_a_length_sweet_spot_and_punishes_copying():
    medium = S.gold_scores(PROMPT, GOOD)["creativity"]
    rambling = GOOD + " " + " ".join(f"It also visited place number {i} to see things." for i in range(12))
    assert S.gold_scores(PROMPT, rambling)["creativity"] < medium / 2
    assert S.gold_scores(PROMPT, GOOD.replace("clever ", "").replace("fluffy ", "").replace("gentle and ", ""))[
        "creativity"] < medium
    copied = PROMPT + " " + PROMPT
    assert S.gold_scores(PROMPT, copied)["creativity"] == 0.0


def test_scores_stay_in_range_and_empty_is_zero():
    assert S.gold_scores(PROMPT, "") == {"relevance": 0.0, "consistency": 0.0, "creativity": 0.0}
    rng = random.Random(0)
    for p in S.rl_prompts(40, seed=3):
        for r in S.candidate_responses(p["prompt"], 3, seed=1) + [" ".join(rng.choice(S.ANIMALS) for _ in range(99))]:
            assert all(0.0 <= v <= 1.0 for v in S.gold_scores(p["prompt"], r).values())


def test_response_quality_knob_moves_the_gold_score():
    rng = random.Random(0)
    prompts = [p["prompt"] for p in S.rl_prompts(150, seed=0)]

    def mean_gold(q: float) -> float:
        return statistics.fmean(S.gold_total(p, S.write_response(rng, p, S.random_style(rng, q))) for p in prompts)

    low, mid, high = mean_gold(0.1), mean_gold(0.5), mean_gold(0.95)
    assert low + 0.1 < mid < high - 0.1


def test_data_is_deterministic_by_seed_and_splits_are_disjoint():
    assert S.sft_records(50, seed=7) == S.sft_records(50, seed=7)
    assert S.pretraining_corpus(30, seed=7) == S.pretraining_corpus(30, seed=7)
    assert S.sft_records(50, seed=7) != S.sft_records(50, seed=8)
    evals = {r["prompt"] for r in S.eval_prompts(60, seed=0)}
    assert len(evals) == 60
    train = {r["prompt"] for s in (0, 1) for r in S.rl_prompts(300, seed=s) + S.sft_records(300, seed=s)}
    assert not evals & train
    sft = S.sft_records(200, seed=0)
    assert all(r["completion"].startswith(" ") and r["prompt"] for r in sft)
    gold = [S.gold_total(r["prompt"], r["completion"]) for r in sft]
    assert 0.6 < statistics.fmean(gold) < 0.9  # decent but room to improve


def test_preference_pairs_follow_gold(tmp_path):
    pairs = S.preference_pairs(60, seed=2)
    assert len(pairs) > 50
    assert all(S.gold_total(p["prompt"], p["chosen"]) > S.gold_total(p["prompt"], p["rejected"]) for p in pairs)
    files = S.write_demo_data(tmp_path, seed=0, corpus=20, sft=10, rl=10, evaluation=5)
    assert sorted(files) == ["corpus", "eval_prompts", "rl_prompts", "sft"]
    assert len(files["eval_prompts"].read_text().splitlines()) == 5


SCALES = dict.fromkeys(S.CRITERIA, (1, 7))
NO_BIAS = dict.fromkeys(S.CRITERIA, 0.0)


def _tau_with_gold(annotators, items) -> float:
    taus = []
    for prompt, responses in items:
        gold = [S.gold_total(prompt, r) for r in responses]
        for a in annotators:
            ranking = a.judge(prompt, responses, SCALES).ranking
            position = [ranking.index(i) for i in range(len(responses))]
            taus.append(kendalltau([-g for g in gold], position).statistic)
    return statistics.fmean(t for t in taus if t == t)


@pytest.fixture(scope="module")
def items():
    return [(p["prompt"], S.candidate_responses(p["prompt"], 4, seed=5)) for p in S.rl_prompts(60, seed=4)]


def test_noiseless_unbiased_annotator_reproduces_gold(items):
    exact = S.Annotator("exact", noise=0.0, bias=dict(NO_BIAS), weights=S.GOLD_WEIGHTS)
    for prompt, responses in items:
        j = exact.judge(prompt, responses, SCALES)
        gold = [S.gold_total(prompt, r) for r in responses]
        assert [gold[i] for i in j.ranking] == sorted(gold, reverse=True)
        for r, rating in zip(responses, j.ratings, strict=True):
            assert rating == {c: round(1 + 6 * v) for c, v in S.gold_scores(prompt, r).items()}


def test_agreement_falls_with_noise_and_bias_shifts_ratings(items):
    names = [f"sim-{i}" for i in range(4)]
    careful = S.make_annotators(names, noise=0.3, bias_scale=0.0, weights=S.GOLD_WEIGHTS)
    sloppy = S.make_annotators(names, noise=3.0, bias_scale=0.0, weights=S.GOLD_WEIGHTS)
    tau_careful, tau_sloppy = _tau_with_gold(careful, items), _tau_with_gold(sloppy, items)
    assert tau_careful > 0.75
    assert tau_careful > tau_sloppy + 0.3
    harsh = S.Annotator("harsh", seed=2, noise=0.3, bias={**NO_BIAS, "relevance": -2.0})
    fair = S.Annotator("fair", seed=2, noise=0.3, bias=dict(NO_BIAS))
    shift = statistics.fmean(h["relevance"] - f["relevance"] for p, rs in items
                             for h, f in zip(harsh.judge(p, rs, SCALES).ratings, fair.judge(p, rs, SCALES).ratings,
                                             strict=True))
    assert -2.4 < shift < -1.2  # clipping at 1 eats a little of the bias


def test_seeded_annotators_label_the_same_tasks_the_same_way(items):
    def labels(people):
        return [a.judge(p, rs, SCALES) for p, rs in items[:10] for a in people]

    names = ["a", "b", "c"]
    assert labels(S.make_annotators(names, seed=9)) == labels(S.make_annotators(names, seed=9))
    assert labels(S.make_annotators(names, seed=9)) != labels(S.make_annotators(names, seed=10))
    people = S.make_annotators(names, seed=9, bias_scale=0.5)
    labels(people)
    assert len({tuple(p.bias.values()) for p in people}) == 3  # each has their own bias
    assert set(people[0].bias) == set(S.CRITERIA)
    prompt, responses = items[0]
    one = S.Annotator("one", seed=1)
    again = {tuple(one.judge(prompt, responses, SCALES).ratings[0].values()) for _ in range(12)}
    assert len(again) > 1  # the noise is really drawn per labelling
    narrow = S.Annotator("narrow", seed=1, noise=3.0).judge(prompt, responses, {"relevance": (2, 4)})
    assert sorted(narrow.ranking) == [0, 1, 2, 3]
    assert all(set(r) == {"relevance"} and 2 <= r["relevance"] <= 4 for r in narrow.ratings)
    assert S.Annotator("lazy", skip_rate=1.0).judge(prompt, responses, SCALES) is None


def test_base_model_pretrains_on_the_corpus_and_is_reused(tmp_path):
    """The demo's pretraining path: {"text"} records through the SFT stage lower the held-out loss,
    and a finished run is reused rather than trained again."""
    import torch

    from alignloop.demo_world import BaseModelSize, build_base_model
    from alignloop.runs import read_metrics

    corpus = S.write_jsonl(tmp_path / "corpus.jsonl", S.pretraining_corpus(240, seed=0))
    size = BaseModelSize(vocab_size=300, hidden=32, layers=2, heads=2, max_positions=160)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_base_model(tmp_path / "base", corpus, size=size, steps=25)
    finally:
        torch.set_num_threads(threads)
    assert (model / "config.json").is_file() and (tmp_path / "base" / "pretrain" / "FINISHED").is_file()
    evals = [r["eval_loss"] for r in read_metrics(tmp_path / "base" / "pretrain" / "metrics.jsonl") if "eval_loss" in r]
    assert evals[-1] < 0.85 * evals[0]  # 25 steps of a 32-wide model: a clear drop, far from converged
    stamp = (model / "model.safetensors").stat().st_mtime_ns
    assert build_base_model(tmp_path / "base", corpus, size=size, steps=25) == model
    assert (model / "model.safetensors").stat().st_mtime_ns == stamp


def test_word_soup_is_neither_consistent_nor_creative():
    """A random model's fragments are not rewarded for being "new words" that contradict nothing."""
    soup = "wh atnd woone ail braveail wi sk rr omn tref glap undo strak pli"
    g = S.gold_scores(PROMPT, soup)
    assert g["consistency"] == 0.0 and g["creativity"] == 0.0
    plain_english = ("The red fox, with its shimmering coat, sings sweet melodies every evening in the quiet forest, "
                     "where the old trees listen.")
    assert S.gold_scores(PROMPT, plain_english)["consistency"] == 1.0  # English about the world is fine
    generated = {w for p in S.rl_prompts(100, seed=0) for r in S.candidate_responses(p["prompt"], 3, seed=0)
                 for w in S.words(p["prompt"] + " " + r)}
    assert generated <= S.LEXICON


def test_benchmark_choices_name_what_was_asked_exactly_once():
    items = S.benchmark_choice_items(60, seed=0)
    assert items == S.benchmark_choice_items(60, seed=0) and len({i["question"] for i in items}) == 60
    assert all(S.is_eval_prompt(i["question"]) for i in items)  # held out from every training prompt
    for item in items:
        asked = S.requested_entities(item["question"])
        full = [c for c in item["choices"] if all(S.requested_entities(c).get(k) == v for k, v in asked.items())]
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        assert full == [item["choices"][item["answer"]]]
    assert {i["answer"] for i in items} == {0, 1, 2, 3}
    assert S.benchmark_choice_items(1, seed=3)[0] == {
        "question": "Describe a rabbit that loves painting.", "answer": 0,
        "choices": ["The rabbit paints far away.", "The rabbit jumps far away.", "The rabbit digs far away.",
                    "The rabbit dances far away."]}


def test_benchmark_counts_answer_their_arithmetic():
    for item in S.benchmark_count_items(60, seed=0):
        a, b = (int(n) for n in re.findall(r"\d+", item["question"]))
        expected = a + b if "How many" in item["question"] and "more" in item["question"] else a - b
        assert item["answer"] == str(expected) and int(item["answer"]) >= 0
