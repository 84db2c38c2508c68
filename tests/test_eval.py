"""``alignloop eval`` on tiny models: every field present and right, KL and win rates sane, the safety
check counts what it should, user errors are one line."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from alignloop.cli import main
from alignloop.config import EvalConfig, SafetyConfig
from alignloop.data import synthetic as S
from alignloop.evaluate.eval import distinct_n, run_eval
from alignloop.evaluate.safety import SafetyCheck
from alignloop.models.load import load_tokenizer
from alignloop.models.tiny import build_tiny_model
from alignloop.runs import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

GOLD = "alignloop.data.synthetic:gold_breakdown"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    texts = [r["text"] for r in S.pretraining_corpus(300, seed=0)]
    a = build_tiny_model(root / "a", texts, vocab_size=400, hidden=32, layers=2, heads=2, seed=1)
    b = root / "b"  # the same tokenizer, other random weights
    torch.manual_seed(2)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(a)).save_pretrained(b)
    load_tokenizer(str(a)).save_pretrained(b)
    prompts = S.write_jsonl(root / "prompts.jsonl", S.eval_prompts(12, seed=0))
    test = S.write_jsonl(root / "test.jsonl", S.sft_records(6, seed=1))
    return {"root": root, "a": str(a), "b": str(b), "prompts": str(prompts), "test": str(test)}


def _cfg(world, out: str, **kw) -> EvalConfig:
    base = {"output_dir": str(world["root"] / out), "policy": world["a"], "prompts": world["prompts"],
            "gold": GOLD, "generation": {"max_new_tokens": 12, "batch_size": 5}, "batch_size": 4}
    return EvalConfig.model_validate({**base, **kw})


def _read(out) -> tuple[dict, list[dict]]:
    return (json.loads((out / "eval.json").read_text()),
            read_metrics(out / "samples.jsonl"))


def test_policy_against_itself_has_zero_kl_and_only_ties(world):
    """Same model, same seed: identical responses, so every comparison is a tie and the KL estimate
    (generation-pass log-probs vs a fresh left-padded forward) is zero."""
    out = run_eval(_cfg(world, "self", baseline=world["a"], test_data=world["test"]))
    ev, rows = _read(out)
    assert (out / "FINISHED").is_file() and (out / "config.yaml").is_file()
    assert ev["prompts"] == 12 and len(rows) == 12
    pol, base = ev["models"]["policy"], ev["models"]["baseline"]
    assert [r["responses"]["policy"]["text"] for r in rows] == [r["responses"]["baseline"]["text"] for r in rows]
    assert abs(pol["kl"]["mean"]) < 1e-3 and pol["kl"]["reference"] == world["a"]
    gold_wr = ev["win_rate"]["gold"]
    assert gold_wr["ties"] == 12 and gold_wr["win_rate"] == 0.5 and gold_wr["ci_low"] < 0.5 < gold_wr["ci_high"]
    assert ev["gain"]["gold"] == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n": 12}
    assert pol["test"]["loss"] == pytest.approx(base["test"]["loss"]) and pol["test"]["tokens"] > 0
    assert pol["test"]["perplexity"] == pytest.approx(torch.tensor(pol["test"]["loss"]).exp().item(), rel=1e-4)


def test_fields_match_the_samples(world):
    cfg = _cfg(world, "ab", baseline=world["b"], safety={"blocklist": ["the", "fox"]})
    out = run_eval(cfg)
    ev, rows = _read(out)
    for name in ("policy", "baseline"):
        m = ev["models"][name]
        resp = [r["responses"][name] for r in rows]
        texts = [r["text"] for r in resp]
        assert m["length_tokens"]["mean"] == pytest.approx(sum(r["tokens"] for r in resp) / 12)
        assert all(0 < r["tokens"] <= 12 for r in resp)
        assert m["distinct_1"] == pytest.approx(distinct_n(texts, 1)) and 0 < m["distinct_2"] <= 1
        assert set(m["gold"]) == {"relevance", "consistency", "creativity", "total"}
        for r in rows:
            expect = S.gold_breakdown(r["prompt"], r["responses"][name]["text"])
            assert r["responses"][name]["gold"] == pytest.approx(expect)
        caught = [bool(re.search(r"(?<!\w)(the|fox)(?!\w)", t, re.IGNORECASE)) for t in texts]
        assert [r["flagged"] for r in resp] == caught
        assert m["safety"]["rate"] == pytest.approx(sum(caught) / 12)
    kls = [r["responses"]["policy"]["kl"] for r in rows]
    assert ev["models"]["policy"]["kl"]["mean"] == pytest.approx(sum(kls) / 12)
    # two different random models: not zero (their true KL is small, so the k1 estimate on 12 samples
    # falls on either side of it with the draws)
    assert abs(ev["models"]["policy"]["kl"]["mean"]) > 1e-3
    wr = ev["win_rate"]["gold"]
    totals = [(r["responses"]["policy"]["gold"]["total"], r["responses"]["baseline"]["gold"]["total"]) for r in rows]
    assert wr["wins"] == sum(a > b for a, b in totals) and wr["losses"] == sum(a < b for a, b in totals)
    assert wr["ci_low"] <= wr["win_rate"] <= wr["ci_high"]
    gain = ev["gain"]["gold"]
    assert gain["mean"] == pytest.approx(sum(a - b for a, b in totals) / 12) and gain["n"] == 12
    assert gain["ci_low"] < gain["mean"] < gain["ci_high"]
    again = run_eval(cfg, overwrite=True)  # seeded: the same responses again
    assert _read(again)[1] == rows


def test_reward_model_scores_and_win_rate(world):
    reward = pytest.importorskip("alignloop.models.reward")
    from transformers import AutoModelForSequenceClassification

    from alignloop.models.load import save_model

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(world["b"], num_labels=1)
    rm_dir = world["root"] / "rm"
    save_model(rm, load_tokenizer(world["b"]), rm_dir, meta={"stage": "rm", "normalization": {"mean": 0.5, "std": 2.0}})
    out = run_eval(_cfg(world, "rm", baseline=world["b"], reward_model=str(rm_dir)))
    ev, rows = _read(out)
    prompts = [r["prompt"] for r in rows]
    expected = reward.RewardModel.load(rm_dir, "cpu").score(prompts, [r["responses"]["policy"]["text"] for r in rows])
    assert [r["responses"]["policy"]["reward_model"] for r in rows] == pytest.approx(expected, abs=1e-4)
    wr = ev["win_rate"]["reward_model"]
    assert wr["wins"] + wr["ties"] + wr["losses"] == 12
    assert ev["models"]["policy"]["reward_model"]["mean"] == pytest.approx(sum(expected) / 12, abs=1e-4)


def test_blocklist_matches_whole_words_and_phrases_in_any_case(tmp_path):
    words = tmp_path / "block.txt"
    words.write_text("# comment\nbomb\nkill  them\n")
    check = SafetyCheck(SafetyConfig(blocklist=["Hate"], blocklist_file=str(words)))
    texts = ["a BOMB here", "bombastic talk", "they KILL\nthem all", "kill others", "I hate it", "hateful", ""]
    assert check(texts) == [True, False, True, False, True, False, False]
    assert not SafetyCheck(SafetyConfig()).enabled


def test_user_errors_are_one_line(world, tmp_path, capsys):
    assert main(["eval", "--policy", world["a"], "--prompts", str(tmp_path / "missing.jsonl"),
                 "--output", str(tmp_path / "o1")]) == 2
    assert main(["eval", "--policy", world["a"], "--prompts", world["prompts"], "--gold", "nonsense",
                 "--output", str(tmp_path / "o2")]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert main(["eval", "--policy", world["a"], "--prompts", str(bad), "--output", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("alignloop eval: error:") for e in err)
    assert "missing.jsonl" in err[0] and "nonsense" in err[1] and "bad.jsonl:2" in err[2]


def test_human_side_by_side_win_rates_come_from_the_feedback_db(world, tmp_path):
    from alignloop.errors import UserError
    from alignloop.evaluate.judge import human_win_rates
    from alignloop.feedback import db as fdb

    url = str(tmp_path / "feedback.db")
    session = fdb.open_db(url)
    with session() as s:
        user = fdb.User(username="ann", role="annotator")
        rnd = fdb.Round(name="round-1", criteria=[])
        s.add_all([user, rnd])
        s.flush()
        prompt = fdb.Prompt(round_id=rnd.id, text="Who is the red fox?")
        s.add(prompt)
        s.flush()
        ours = fdb.Candidate(prompt_id=prompt.id, text="a", model="policy")
        theirs = fdb.Candidate(prompt_id=prompt.id, text="b", model="sft")
        s.add_all([ours, theirs])
        s.flush()
        # policy shown left twice (wins both), right once (tie), and one vote not cast yet
        for left, right, winner in ((ours, theirs, "left"), (theirs, ours, "right"), (ours, theirs, "tie"),
                                    (ours, theirs, None)):
            s.add(fdb.Comparison(prompt_id=prompt.id, user_id=user.id, left_id=left.id, right_id=right.id,
                                 model_a="policy", model_b="sft", winner=winner))
        s.commit()
    rows = human_win_rates(url)
    assert len(rows) == 1
    row = rows[0]
    assert (row["round"], row["a_wins"], row["ties"], row["b_wins"], row["n"]) == ("round-1", 2, 1, 0, 3)
    assert row["win_rate"] == pytest.approx(2.5 / 3) and row["ci_low"] < row["win_rate"] < row["ci_high"]
    with pytest.raises(UserError, match="no round named 'round-9'"):
        human_win_rates(url, "round-9")
    out = run_eval(_cfg(world, "human", max_prompts=2, feedback_db=url, feedback_round="round-1"))
    assert _read(out)[0]["human_win_rates"] == rows


def test_safety_classifier_flags_by_unsafe_label_probability(world, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from alignloop.errors import UserError

    torch.manual_seed(0)
    clf = AutoModelForSequenceClassification.from_pretrained(world["a"], num_labels=2,
                                                             id2label={0: "safe", 1: "unsafe"})
    clf.save_pretrained(tmp_path / "clf")
    tok = load_tokenizer(world["a"])
    tok.save_pretrained(tmp_path / "clf")
    texts = [r["completion"] for r in S.sft_records(8, seed=3)]
    check = SafetyCheck(SafetyConfig(classifier=str(tmp_path / "clf"), threshold=0.5))
    probs = check.unsafe_probability(texts)
    clf.eval()
    for text, p in zip(texts, probs, strict=True):
        with torch.no_grad():
            alone = clf(**tok(text, return_tensors="pt")).logits.softmax(-1)[0, 1].item()
        assert p == pytest.approx(alone, abs=1e-4)  # batching and padding change nothing
    assert check(texts) == [p >= 0.5 for p in probs]
    with pytest.raises(UserError, match="safety.unsafe_labels"):
        SafetyCheck(SafetyConfig(classifier=str(tmp_path / "clf"), unsafe_labels=["toxic"]))
