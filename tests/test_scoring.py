"""Which texts ``alignloop score`` sends to the reward model for each feedback layout, and where the rewards go."""

from __future__ import annotations

import pytest

from alignloop.data.io import Record
from alignloop.errors import UserError
from alignloop.models.scoring import scoring_inputs


def rec(**data) -> Record:
    return Record(data=data, where="f.jsonl:1")


def test_prompt_response_is_one_reward():
    assert scoring_inputs(rec(prompt="Q", response="A")) == (["Q"], ["A"], "reward")


def test_pair_scores_chosen_then_rejected_on_the_same_prompt():
    assert scoring_inputs(rec(prompt="Q", chosen="good", rejected="bad")) == (["Q", "Q"], ["good", "bad"], "pair")


def test_ranking_scores_every_response_in_record_order():
    got = scoring_inputs(rec(prompt="Q", responses=["a", "b", "c"], ranking=[2, 0, 1]))
    assert got == (["Q", "Q", "Q"], ["a", "b", "c"], "rewards")


def test_rating_is_one_reward_and_chat_prompts_stay_messages():
    messages = [{"role": "user", "content": "Hi"}]
    assert scoring_inputs(rec(prompt=messages, response="Hello", scores={"relevance": 6})) == (
        [messages], ["Hello"], "reward")
    assert scoring_inputs(rec(prompt="Q", response="A", score=3)) == (["Q"], ["A"], "reward")


def test_a_record_of_no_feedback_layout_names_its_line():
    with pytest.raises(UserError, match="f.jsonl:1"):
        scoring_inputs(rec(text="just text"))
