"""Data layer: readers, column maps, cleaning report, split, completion-only labels, truncation, packing."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest
import torch

from alignloop.config import CleanConfig
from alignloop.data.clean import clean_records
from alignloop.data.formats import Conversation, PromptCompletion, chat_as_lines, parse_sft
from alignloop.data.io import Record, read_records
from alignloop.data.splits import split_by_seed
from alignloop.data.tokenize import (
    IGNORE,
    collate_packed,
    encode_prompt,
    pack_examples,
    render_prompt,
    tokenize_sft,
)
from alignloop.errors import UserError
from conftest import write_jsonl

ROWS = [{"instruction": f"say {i}", "output": f"number {i}"} for i in range(5)]


def test_every_format_reads_the_same_records(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "a.jsonl", ROWS)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "a.csv").write_text("instruction,output\n" + "".join(f"{r['instruction']},{r['output']}\n" for r in ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    cmap = {"instruction": "prompt", "output": "completion"}
    for name in ("a.jsonl", "a.jsonl.gz", "a.csv", "a.parquet", "saved"):
        recs = read_records(tmp_path / name, column_map=cmap)
        assert [r.data for r in recs] == [{"prompt": r["instruction"], "completion": r["output"]} for r in ROWS], name
    assert read_records(tmp_path / "a.csv")[2].where.endswith("a.csv:4")  # header is line 1


def test_conll_reader_handles_whitespace_only_breaks_and_docstart(tmp_path):
    (tmp_path / "x.conll").write_text("-DOCSTART- O\n\nJohn\tB-person\nruns\tO\n\t\nParis\tB-location\n")
    recs = read_records(tmp_path / "x.conll")
    assert [r.data for r in recs] == [{"tokens": ["John", "runs"], "tags": ["B-person", "O"]},
                                      {"tokens": ["Paris"], "tags": ["B-location"]}]


def test_cleaning_rules_are_counted():
    recs = [Record({"prompt": p, "completion": c}, f"f:{i}") for i, (p, c) in enumerate([
        ("Caf\u0065\u0301  menu", "ok\x07 fine"),            # NFC, control char, double space
        ("<b>bold</b> claim", "yes"),                        # HTML
        ("same", "dup"), ("same", "dup"),                     # exact duplicate
        ("   ", ""),                                         # empty after whitespace cleanup
        ("the quick brown fox jumps over the lazy dog today", "and then it slept under a tree"),
        ("the quick brown fox jumps over the lazy dog today", "and then it slept under a tree!"),  # near dup
        ("x" * 500, "too long"),
    ])]
    cfg = CleanConfig(strip_html=True, dedupe_near=True, near_threshold=0.8, max_chars=200)
    kept, report = clean_records(recs, cfg)
    texts = [r.data for r in kept]
    assert {"prompt": "Café menu", "completion": "ok fine"} in texts
    assert {"prompt": "bold claim", "completion": "yes"} in texts
    assert report["dropped_exact_duplicates"] == 1
    assert report["dropped_empty"] == 1
    assert report["dropped_near_duplicates"] == 1
    assert report["dropped_too_long"] == 1
    assert report["html_stripped"] == 1 and report["control_chars_removed"] == 1
    assert report["records_in"] == 8 and report["records_out"] == len(kept) == 4
    # Every rule can be switched off.
    off = CleanConfig(unicode_form="none", strip_control=False, normalize_whitespace=False, drop_empty=False,
                      dedupe_exact=False)
    assert clean_records(recs, off)[1]["records_out"] == 8


def test_split_is_seeded_and_disjoint():
    items = list(range(100))
    a = split_by_seed(items, 0.1, 0.2, seed=3)
    assert a == split_by_seed(items, 0.1, 0.2, seed=3)
    assert a != split_by_seed(items, 0.1, 0.2, seed=4)
    train, val, test = a
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert sorted(train + val + test) == items


def test_grouped_split_never_straddles_a_group():
    # Like a reward model's feedback: per prompt, one ranking record and four rating records.
    items = [(f"prompt-{p}", kind) for p in range(50) for kind in ("ranking", "r0", "r1", "r2", "r3")]
    train, val, test = split_by_seed(items, 0.2, 0.1, seed=0, group=lambda it: it[0])
    prompts = [{p for p, _ in part} for part in (train, val, test)]
    assert [len(p) for p in prompts] == [35, 10, 5]  # the shares count groups, not records
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    assert sorted(train + val + test) == sorted(items)


@pytest.fixture
def tokenizer(tiny_model):
    from alignloop.models.load import load_tokenizer

    return load_tokenizer(str(tiny_model))


def test_prompt_tokens_are_masked(tokenizer):
    ex = tokenize_sft(PromptCompletion(prompt="Repeat twice: red cat\n", completion="red cat red cat"),
                      tokenizer, 128, 8, Counter())
    n_prompt = len(tokenizer("Repeat twice: red cat\n")["input_ids"])
    assert all(lab == IGNORE for lab in ex.labels[:n_prompt])
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tokenizer.eos_token_id  # the model learns to stop


def test_only_assistant_turns_carry_loss(tokenizer):
    conv = Conversation(messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "red cat"},
                                  {"role": "assistant", "content": "blue dog"}, {"role": "user", "content": "tree"},
                                  {"role": "assistant", "content": "river stone"}])
    ex = tokenize_sft(conv, tokenizer, 256, 8, Counter())
    learned = tokenizer.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE])
    assert "blue dog" in learned and "river stone" in learned
    for user_text in ("be brief", "red cat", "tree"):
        assert user_text not in learned


def test_truncation_never_drops_the_whole_completion(tokenizer):
    stats: Counter = Counter()
    long_prompt = "red cat " * 200
    ex = tokenize_sft(PromptCompletion(prompt=long_prompt, completion="blue dog " * 20), tokenizer, 64, 16, stats)
    assert len(ex) == 64
    assert sum(lab != IGNORE for lab in ex.labels) >= 16
    assert stats["prompts_shortened"] == 1 and stats["prompt_tokens_cut"] > 0
    stats2: Counter = Counter()
    ex2 = tokenize_sft(PromptCompletion(prompt="hi", completion="blue dog " * 100), tokenizer, 64, 16, stats2)
    assert len(ex2) == 64 and stats2["completions_shortened"] == 1


def test_packing_keeps_examples_apart(tiny_model, tokenizer):
    """Logits of a packed row equal those of each example run alone: no attention across boundaries.
    (transformers detects packing from restarting position ids only without a KV cache, as in training.)"""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    exs = [tokenize_sft(PromptCompletion(prompt=p, completion=c), tokenizer, 64, 8, Counter())
           for p, c in [("red cat", "blue"), ("big dog runs", "small bird sleeps"), ("tree", "river stone")]]
    rows = pack_examples(exs, row_len=64)
    assert len(rows) == 1
    batch = collate_packed(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        at = 0
        for ex in rows[0]:
            alone = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            assert torch.allclose(packed[at : at + len(ex)], alone, atol=1e-5)
            at += len(ex)
    assert batch["loss_units"] == sum(sum(lab != IGNORE for lab in e.labels) for e in exs)


def test_parse_errors_name_the_field():
    with pytest.raises(UserError, match=r"f.jsonl:3: field 'messages': needs at least one assistant"):
        parse_sft(Record({"messages": [{"role": "user", "content": "hi"}]}, "f.jsonl:3"))


def test_chat_as_lines_writes_role_content_turns():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"content": "no role"}]
    assert chat_as_lines(chat) == "system: Be brief.\nuser: Hi\nuser: no role"
    assert chat_as_lines(chat[:2], separator="\n\n") == "system: Be brief.\n\nuser: Hi"
    assert chat_as_lines([]) == ""


def test_encode_prompt_adds_special_tokens_to_text_only_and_keeps_the_end(tokenizer):
    text = "Repeat twice: red cat dog\n"
    plain = tokenizer(text, add_special_tokens=True)["input_ids"]
    assert encode_prompt(tokenizer, text, 512) == plain
    assert encode_prompt(tokenizer, text, 3) == plain[-3:]  # the response follows the end, so the start goes
    chat = [{"role": "user", "content": "Repeat twice: red cat dog"}]
    rendered = render_prompt(tokenizer, chat)
    assert encode_prompt(tokenizer, chat, 512) == tokenizer(rendered, add_special_tokens=False)["input_ids"]
