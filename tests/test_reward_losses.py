"""Reward objectives against hand-computed values, and bad feedback records rejected in one line."""

from __future__ import annotations

import json
import math
from itertools import combinations

import pytest
import torch

from alignloop.cli import main
from alignloop.models.reward import combine_criteria
from alignloop.train.reward_losses import (
    bradley_terry,
    centering_penalty,
    group_mean_sum,
    kwise_ranking_loss,
    ordinal_loss,
    ranking_pairs,
    rating_targets,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_bradley_terry_matches_hand_values_and_margin_shifts_it():
    delta = torch.tensor([2.0, -1.0, 0.0])
    assert torch.allclose(bradley_terry(delta), torch.tensor([-log_sigmoid(2.0), -log_sigmoid(-1.0), math.log(2)]))
    # -log sigmoid(delta - margin): a margin of 1.5 on delta 2 leaves the loss of delta 0.5.
    with_margin = bradley_terry(delta, torch.tensor([1.5, 0.0, -1.0]))
    assert with_margin[0].item() == pytest.approx(-log_sigmoid(0.5), abs=1e-6)
    assert with_margin[1].item() == pytest.approx(-log_sigmoid(-1.0), abs=1e-6)
    assert with_margin[2].item() == pytest.approx(-log_sigmoid(1.0), abs=1e-6)
    assert with_margin[0] > bradley_terry(delta)[0]  # a positive margin demands more: higher loss


def test_kwise_loss_is_the_mean_bt_loss_over_all_pairs():
    r = torch.tensor([0.3, 1.2, -0.4, 2.0])
    ranking = [[3], [1], [0], [2]]  # 3 > 1 > 0 > 2
    pairs = ranking_pairs(ranking)
    assert len(pairs) == math.comb(4, 2)
    expected = sum(-log_sigmoid((r[a] - r[b]).item()) for a, b in pairs) / 6
    assert kwise_ranking_loss(r, ranking).item() == pytest.approx(expected, abs=1e-6)
    # every pair of the ranking appears once, better first
    assert {frozenset(p) for p in pairs} == {frozenset(p) for p in combinations(range(4), 2)}
    assert all(ranking[0][0] == a for a, b in pairs if 3 in (a, b))


def test_ties_produce_no_pair():
    # 2 is best, 0 and 3 tie, 1 is worst: 2>0, 2>3, 2>1, 0>1, 3>1 and nothing between 0 and 3.
    pairs = ranking_pairs([[2], [0, 3], [1]])
    assert sorted(pairs) == sorted([(2, 0), (2, 3), (2, 1), (0, 1), (3, 1)])
    assert ranking_pairs([[0, 1, 2]]) == []
    with pytest.raises(ValueError):
        kwise_ranking_loss(torch.zeros(3), [[0, 1, 2]])


def test_group_mean_sum_weighs_each_prompt_once():
    # group 0 has 3 pair losses, group 1 has one: the sum of their means, not of all four values
    values = torch.tensor([1.0, 2.0, 3.0, 10.0])
    assert group_mean_sum(values, torch.tensor([0, 0, 0, 1]), 2).item() == pytest.approx(2.0 + 10.0)


def test_rating_targets_centering_and_ordinal():
    t = rating_targets(torch.tensor([1.0, 4.0, 7.0]), torch.tensor(1.0), torch.tensor(7.0), 2.0)
    assert torch.allclose(t, torch.tensor([-2.0, 0.0, 2.0]))
    assert centering_penalty(torch.tensor([1.0, -3.0])).item() == pytest.approx(5.0)
    # 3 levels on [-2, 2] -> places -2, 0, 2; cut points -1 and 1. Level 1 (middle) at reward 0:
    # loss = softplus(-(0 - -1)) + softplus(0 - 1) = 2 * log(1 + e^-1)
    loss = ordinal_loss(torch.tensor([0.0]), torch.tensor([1]), torch.tensor([3]), 2.0)
    assert loss.item() == pytest.approx(2 * math.log1p(math.exp(-1)), abs=1e-6)
    # the loss is smallest near the level's own place and grows moving away from it
    preds = torch.tensor([-2.0, 0.0, 2.0])
    top = ordinal_loss(preds, torch.tensor([2, 2, 2]), torch.tensor([3, 3, 3]), 2.0)
    assert top[2] < top[1] < top[0]


BAD_RECORDS = [
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 3, 1]}, "index 3 is out of range"),
    ({"prompt": "p", "responses": ["a"], "ranking": [0]}, "at least 2 responses"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "criterion": "humour"}, "'humour' is not a configured criterion"),
    ({"prompt": "p", "response": "a", "scores": {"relevance": 5, "wit": 3}}, "'wit' is not a configured criterion"),
    ({"prompt": "p", "response": "a", "scores": {"relevance": "high"}}, "field 'scores.relevance'"),
    ({"prompt": "p", "response": "a", "score": "7"}, "field 'score'"),
]


@pytest.mark.parametrize("bad,expected", BAD_RECORDS, ids=[e for _, e in BAD_RECORDS])
def test_bad_feedback_is_one_line_naming_file_and_line(tmp_path, capsys, bad, expected):
    good = {"prompt": "p", "chosen": "yes", "rejected": "no"}
    data = tmp_path / "fb.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps(good | {"chosen": "sure"}) + "\n" + json.dumps(bad) + "\n")
    code = main(["rm", "--model", str(tmp_path / "unused"), "--data", str(data), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{data}:3:" in err and expected in err
    assert not (tmp_path / "run").exists()  # rejected before anything was written


def test_training_batch_applies_kwise_margin_and_centring_per_unit():
    from alignloop.config import RMConfig
    from alignloop.train.reward import Encoded, Group, batch_structure, objective_sum, rewards_with_combined

    order = [[3], [1], [0], [2]]
    ranking = Group("p", ["a", "b", "c", "d"], "f:1", pairs=ranking_pairs(order), margins=[None] * 6)
    pair = Group("q", ["x", "y"], "f:2", pairs=[(0, 1)], margins=[1.5])
    items = [Encoded(ranking, [[5]] * 4), Encoded(pair, [[5]] * 2)]
    logits = torch.tensor([[0.3], [1.2], [-0.4], [2.0], [0.5], [0.1]])
    cols = rewards_with_combined(logits, torch.ones(1))
    batch = batch_structure(items, n_heads=1)
    assert batch["loss_units"] == 2  # one unit per prompt group, not per pair

    cfg = RMConfig(model={"name_or_path": "m"}, data={"train": "d"})
    expected = kwise_ranking_loss(logits[:4, 0], order) + bradley_terry(torch.tensor(0.4), torch.tensor(1.5))
    assert objective_sum(cols, batch, cfg).item() == pytest.approx(expected.item(), abs=1e-6)

    cfg = RMConfig(model={"name_or_path": "m"}, data={"train": "d"}, objective={"centering": 0.1})
    centring = 0.1 * (centering_penalty(logits[:4, 0]) + centering_penalty(logits[4:, 0]))
    assert objective_sum(cols, batch, cfg).item() == pytest.approx((expected + centring).item(), abs=1e-6)


def test_hh_rlhf_dialogues_split_at_the_last_shared_assistant_turn():
    from alignloop.data.formats import PreferencePair, parse_feedback
    from alignloop.data.io import Record

    base = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me?\n\nAssistant:"
    fb = parse_feedback(Record({"chosen": base + " Sure, here is how.", "rejected": base + " No."}, "hh.jsonl:1"))
    assert isinstance(fb, PreferencePair)
    assert fb.prompt == base and fb.chosen == " Sure, here is how." and fb.rejected == " No."


def test_combine_criteria_weights_and_normalises_by_hand():
    scores = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    weights = torch.tensor([0.5, 0.3, 0.2])
    # 0.5·1 + 0.3·2 + 0.2·3 = 1.7; (1.7 - 0.7) / 2 = 0.5 and (0 - 0.7) / 2 = -0.35
    assert combine_criteria(scores, weights).tolist() == pytest.approx([1.7, 0.0])
    assert combine_criteria(scores, weights, mean=0.7, std=2.0).tolist() == pytest.approx([0.5, -0.35])
    # Linear: applied to a score head's parameters it gives one head that says the same.
    W, b, h = torch.randn(3, 5), torch.randn(3), torch.randn(4, 5)
    one_head = h @ combine_criteria(W.T, weights, std=2.0) + combine_criteria(b, weights, 0.7, 2.0)
    assert torch.allclose(one_head, combine_criteria(h @ W.T + b, weights, 0.7, 2.0), atol=1e-6)
