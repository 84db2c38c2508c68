"""Export aggregation rules, agreement metrics, the Alembic schema and the feedback CLI commands."""

from __future__ import annotations

import json

import pytest

from alignloop.cli import main
from alignloop.config import DPOConfig
from alignloop.data.formats import parse_feedback
from alignloop.data.io import Record, read_records
from alignloop.feedback import agreement, auth, tasks
from alignloop.feedback.db import DEFAULT_CRITERIA, Prompt, User, open_db
from alignloop.feedback.export import borda, export_records
from alignloop.train.dpo import kto_units, parse_record
from feedback_fixtures import *  # noqa: F403  (fixtures)
from feedback_fixtures import PASSWORD


def seed_round(Sessions, overlap=3, items=None, criteria=None):
    """A round whose items are labelled directly through tasks (what the API calls)."""
    with Sessions() as db:
        rnd = tasks.create_round(db, "r", criteria or [{"name": "relevance", "min": 1, "max": 7},
                                                       {"name": "creativity", "min": 1, "max": 7}], overlap=overlap)
        tasks.add_items(db, rnd, items or [{"prompt": "P", "responses": ["A", "B", "C"]}])
        users = [auth.create_user(db, f"u{i}", "annotator", PASSWORD) for i in range(overlap)]
        db.commit()
        return rnd, users


def label_as(Sessions, username, ranking_texts, ratings=None, flags=None, skip=False):
    with Sessions() as db:
        user = db.query(User).filter_by(username=username).one()
        rnd = tasks.get_round(db, "r")
        a = tasks.next_task(db, user, rnd)
        by_text = {c.text: c.id for c in a.prompt.candidates}
        payload = {"skip": skip, "ranking": [by_text[t] for t in ranking_texts],
                   "ratings": {by_text[t]: s for t, s in (ratings or {}).items()},
                   "flags": [{"candidate_id": by_text[t], "kind": k} for t, k in (flags or [])]}
        tasks.submit_label(db, user, a.id, payload)


def export(Sessions, fmt, **kw):
    with Sessions() as db:
        return export_records(db, tasks.get_round(db, "r"), fmt, **kw)


def test_borda_orders_by_mean_position_and_keeps_exact_ties():
    assert borda([[1, 2, 3], [1, 3, 2], [2, 1, 3]], [1, 2, 3]) == [0, 1, 2]
    assert borda([[1, 2], [2, 1]], [1, 2]) == [[0, 1]]
    assert borda([[3, 1, 2]], [1, 2, 3]) == [2, 0, 1]


def test_overlapping_labels_are_aggregated_by_the_documented_rules(fb_sessions):
    seed_round(fb_sessions, overlap=3)
    label_as(fb_sessions, "u0", ["A", "B", "C"], ratings={"A": {"relevance": 7}, "B": {"relevance": 4}})
    label_as(fb_sessions, "u1", ["B", "A", "C"], ratings={"A": {"relevance": 5, "creativity": 2}})
    label_as(fb_sessions, "u2", ["A", "C", "B"])
    (rank,) = export(fb_sessions, "rankings")
    # Mean positions: A (0+1+0)/3, B (1+0+2)/3, C (2+2+1)/3 -> A, B, C.
    assert rank == {"prompt": "P", "responses": ["A", "B", "C"], "ranking": [0, 1, 2]}
    pairs = {(p["chosen"], p["rejected"]) for p in export(fb_sessions, "pairs")}
    # A>B 2:1, A>C 3:0, B>C 2:1 (majority each time).
    assert pairs == {("A", "B"), ("A", "C"), ("B", "C")}
    ratings = {r["response"]: r["scores"] for r in export(fb_sessions, "ratings")}
    assert ratings == {"A": {"creativity": 2.0, "relevance": 6.0}, "B": {"relevance": 4.0}}
    per_label = export(fb_sessions, "rankings", per_annotator=True)
    assert [(r["annotator"], r["ranking"]) for r in per_label] == [("u0", [0, 1, 2]), ("u1", [1, 0, 2]),
                                                                    ("u2", [0, 2, 1])]
    # Everything exported is a valid reward-model record.
    for fmt in ("rankings", "pairs", "ratings"):
        for n, rec in enumerate(export(fb_sessions, fmt, per_annotator=True)):
            parse_feedback(Record(rec, f"export:{n + 1}"))


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def test_chat_prompts_are_exported_as_messages_and_read_back(fb_sessions):
    seed_round(fb_sessions, overlap=1, items=[
        {"prompt": "system: Be brief.\n\nuser: Name a colour.", "messages": CHAT, "responses": ["Red.", "Um"]},
        {"prompt": "Plain", "responses": ["yes", "no"]}])
    for _ in range(2):
        with fb_sessions() as db:  # u0 labels both items, the first candidate (as stored) best
            user = db.query(User).filter_by(username="u0").one()
            a = tasks.next_task(db, user, tasks.get_round(db, "r"))
            first, second = a.prompt.candidates
            tasks.submit_label(db, user, a.id, {"ranking": [first.id, second.id],
                                                "ratings": {first.id: {"relevance": 6}}})
    pairs = sorted(export(fb_sessions, "pairs"), key=lambda r: str(r["prompt"]))
    # TRL's conversational preference format for the chat prompt; the plain one stays plain.
    assert pairs == [{"prompt": "Plain", "chosen": "yes", "rejected": "no"},
                     {"prompt": CHAT, "chosen": [{"role": "assistant", "content": "Red."}],
                      "rejected": [{"role": "assistant", "content": "Um"}]}]
    ranks = {str(r["prompt"]): r for r in export(fb_sessions, "rankings")}
    assert ranks[str(CHAT)]["prompt"] == CHAT and ranks[str(CHAT)]["responses"] == ["Red.", "Um"]
    assert {r["response"]: r["prompt"] for r in export(fb_sessions, "ratings")} == {"Red.": CHAT, "yes": "Plain"}
    # alignloop's reward-model reader takes both forms.
    chat_pair = parse_feedback(Record(pairs[1], "export:2"))
    assert (chat_pair.chosen, chat_pair.rejected) == ("Red.", "Um")
    assert [m.model_dump() for m in chat_pair.prompt] == CHAT
    for fmt in ("rankings", "pairs", "ratings"):
        for n, rec in enumerate(export(fb_sessions, fmt)):
            parse_feedback(Record(rec, f"export:{n + 1}"))


def test_chat_messages_of_an_item_are_checked(fb_sessions):
    with fb_sessions() as db:
        rnd = tasks.create_round(db, "r", [{"name": "q"}])
        for messages, needle in [([], "list of 1 to"), ([{"role": "robot", "content": "x"}], "'role' in"),
                                 ([{"role": "user", "content": 3}], "text 'content'")]:
            with pytest.raises(tasks.Invalid, match=needle):
                tasks.add_items(db, rnd, [{"prompt": "p", "messages": messages, "responses": ["a", "b"]}])


def test_even_split_gives_a_tie_and_no_pair(fb_sessions):
    seed_round(fb_sessions, overlap=2, items=[{"prompt": "P", "responses": ["A", "B"]}])
    label_as(fb_sessions, "u0", ["A", "B"])
    label_as(fb_sessions, "u1", ["B", "A"])
    assert export(fb_sessions, "pairs") == []
    assert export(fb_sessions, "rankings")[0]["ranking"] == [[0, 1]]


def test_skipped_and_unsafe_are_left_out_unless_asked(fb_sessions):
    seed_round(fb_sessions, overlap=3)
    label_as(fb_sessions, "u0", ["A", "B", "C"], flags=[("B", "unsafe"), ("C", "wrong")])
    label_as(fb_sessions, "u1", ["C", "B", "A"], skip=True)
    (rank,) = export(fb_sessions, "rankings")
    assert rank["responses"] == ["A", "C"] and rank["ranking"] == [0, 1]  # B flagged unsafe; the skip counts for nothing
    (full,) = export(fb_sessions, "rankings", include_unsafe=True)
    assert full["responses"] == ["A", "B", "C"] and full["ranking"] == [0, 1, 2]


def test_agreement_metrics(fb_sessions):
    items = [{"prompt": f"P{i}", "responses": ["A", "B", "C", "D"], "gold_ranking": [0, 1, 2, 3]} for i in range(4)]
    seed_round(fb_sessions, overlap=2, items=items, criteria=[{"name": "relevance", "min": 1, "max": 7}])
    scores = {"A": 7, "B": 5, "C": 3, "D": 2}
    for _ in items:  # u0 agrees with gold; u1 reverses it and rates one step lower
        label_as(fb_sessions, "u0", ["A", "B", "C", "D"], ratings={t: {"relevance": v} for t, v in scores.items()})
        label_as(fb_sessions, "u1", ["D", "C", "B", "A"],
                 ratings={t: {"relevance": v - 1} for t, v in scores.items()})
    with fb_sessions() as db:
        rnd = tasks.get_round(db, "r")
        report = agreement.agreement_report(db, rnd)
    assert report["rankings"]["kendall_tau"] == pytest.approx(-1.0) and report["rankings"]["pairs"] == 4
    assert report["rankings"]["over_time"] and all(p["tau"] == pytest.approx(-1.0)
                                                   for p in report["rankings"]["over_time"])
    # Ratings agree up to a constant shift of 1 on a spread of 5: alpha is high but below 1.
    import krippendorff
    import numpy as np

    expected = krippendorff.alpha(reliability_data=np.array([[7, 5, 3, 2] * 4, [6, 4, 2, 1] * 4], dtype=float),
                                  level_of_measurement="interval")
    assert report["ratings_alpha"]["relevance"] == pytest.approx(expected) and 0.8 < expected < 1.0
    assert report["gold"] == {"u0": {"tau": 1.0, "items": 4}, "u1": {"tau": -1.0, "items": 4}}


def test_alembic_schema_matches_the_models(any_db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from alignloop.feedback.db import Base

    Sessions = open_db(any_db_url)
    with Sessions() as db:
        diff = compare_metadata(MigrationContext.configure(db.connection()), Base.metadata)
        assert diff == []
        version = db.connection().exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        assert version == "0002"
    open_db(any_db_url)  # upgrading an up-to-date database is a no-op


def test_cli_create_user_export_and_errors(tmp_path, monkeypatch, capsys, fb_sessions, fb_db_url):
    seed_round(fb_sessions, overlap=1)
    label_as(fb_sessions, "u0", ["C", "A", "B"])
    monkeypatch.setenv("ADMIN_PW", "a-long-password")
    assert main(["feedback", "create-user", "--db", fb_db_url, "--username", "root", "--role", "admin",
                 "--password-env", "ADMIN_PW"]) == 0
    with fb_sessions() as db:
        root = db.query(User).filter_by(username="root").one()
        assert root.role == "admin" and auth.authenticate(db, "root", "a-long-password") is not None
    out = tmp_path / "r.jsonl"
    assert main(["feedback", "export", "--db", fb_db_url, "--round", "r", "--output", str(out)]) == 0
    (rec,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert [rec["responses"][i] for i in rec["ranking"]] == ["C", "A", "B"]
    assert main(["feedback", "invite", "--db", fb_db_url, "--username", "newbie"]) == 0
    assert "/invite/" in capsys.readouterr().out
    capsys.readouterr()
    for argv, needle in [
        (["feedback", "export", "--db", fb_db_url, "--round", "nope", "--output", str(out)], "no round named 'nope'"),
        (["feedback", "export", "--db", str(tmp_path / "missing" / "x.db"), "--round", "r", "--output", str(out)],
         "does not exist"),
        (["feedback", "create-user", "--db", fb_db_url, "--username", "root", "--password-env", "ADMIN_PW"],
         "already exists"),
        (["feedback", "add-items", "--db", fb_db_url, "--round", "r", "--items", str(tmp_path / "none.jsonl")],
         "not found"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_add_items_from_file_and_gold(tmp_path, fb_sessions, fb_db_url):
    seed_round(fb_sessions, overlap=1)
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"prompt": "Q", "responses": ["x", "y"], "gold_ranking": [1, 0]}) + "\n")
    assert main(["feedback", "add-items", "--db", fb_db_url, "--round", "r", "--items", str(items)]) == 0
    with fb_sessions() as db:
        q = db.query(Prompt).filter_by(text="Q").one()
        assert [c.text for c in q.candidates] == ["x", "y"]
        assert q.gold_ranking == [q.candidates[1].id, q.candidates[0].id]


def test_cli_create_round_default_and_custom_criteria_and_errors(tmp_path, capsys, fb_sessions, fb_db_url):
    assert main(["feedback", "create-round", "--db", fb_db_url, "--name", "plain", "--overlap", "2"]) == 0
    criteria = tmp_path / "criteria.json"
    criteria.write_text(json.dumps([{"name": "helpful", "min": 1, "max": 5, "guideline": "does it help?"}]))
    assert main(["feedback", "create-round", "--db", fb_db_url, "--name", "custom", "--criteria", str(criteria),
                 "--guidelines", "Prefer short answers."]) == 0
    with fb_sessions() as db:
        plain, custom = tasks.get_round(db, "plain"), tasks.get_round(db, "custom")
        assert [c["name"] for c in plain.criteria] == [c["name"] for c in DEFAULT_CRITERIA] and plain.overlap == 2
        assert [c["name"] for c in custom.criteria] == ["helpful"] and custom.guidelines == "Prefer short answers."
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    capsys.readouterr()
    for argv, needle in [
        (["--name", "plain"], "round 'plain' already exists"),
        (["--name", "x", "--criteria", str(broken)], f"--criteria {broken}:"),
        (["--name", "y", "--overlap", "0"], "overlap: between 1 and 50"),
    ]:
        assert main(["feedback", "create-round", "--db", fb_db_url, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err


def test_unpaired_export_for_kto_from_rankings_and_reviews(fb_sessions):
    seed_round(fb_sessions, overlap=2, items=[{"prompt": "P", "responses": ["A", "B", "C"]},
                                              {"prompt": "T", "responses": ["X", "Y"]}])
    for user in ("u0", "u1"):  # P: A best and C worst for both; T: an even split
        label_as(fb_sessions, user, ["A", "B", "C"])
    label_as(fb_sessions, "u0", ["X", "Y"])
    label_as(fb_sessions, "u1", ["Y", "X"])
    # The best (loses no comparison) is desirable, the worst (wins none) undesirable; B and the tied T give nothing.
    assert export(fb_sessions, "unpaired") == [{"prompt": "P", "completion": "A", "label": True},
                                               {"prompt": "P", "completion": "C", "label": False}]
    per_label = export(fb_sessions, "unpaired", per_annotator=True)
    assert [(r["annotator"], r["completion"], r["label"]) for r in per_label] == [
        ("u0", "A", True), ("u0", "C", False), ("u1", "A", True), ("u1", "C", False),
        ("u0", "X", True), ("u0", "Y", False), ("u1", "Y", True), ("u1", "X", False)]


def test_unpaired_chat_records_are_what_kto_reads(fb_sessions, tmp_path):
    seed_round(fb_sessions, overlap=1, items=[{"prompt": "system: Be brief.\n\nuser: Name a colour.",
                                               "messages": CHAT, "responses": ["Red.", "Um"]}])
    label_as(fb_sessions, "u0", ["Red.", "Um"])
    records = export(fb_sessions, "unpaired")
    assert records == [{"prompt": CHAT, "completion": [{"role": "assistant", "content": "Red."}], "label": True},
                       {"prompt": CHAT, "completion": [{"role": "assistant", "content": "Um"}], "label": False}]
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = DPOConfig.model_validate({"model": {"name_or_path": "unused"}, "data": {"train": str(path)},
                                    "dpo": {"loss": "kto"}, "output_dir": str(tmp_path / "out")})
    units = kto_units([parse_record(r, None) for r in read_records(path)], cfg)
    assert [(u.prompt, u.responses, u.desirable) for u in units] == [(CHAT, ["Red."], [True]), (CHAT, ["Um"], [False])]
