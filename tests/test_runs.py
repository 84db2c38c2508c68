"""Run-folder JSONL files: one reader for metrics.jsonl / samples.jsonl, tolerant only of a last line cut
off by a crash, and resume's truncation keeping the kept lines byte for byte."""

from __future__ import annotations

import pytest

from alignloop.errors import UserError
from alignloop.runs import MetricsLog, read_metrics


def test_read_metrics_leaves_out_a_cut_off_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == [] and read_metrics(tmp_path) == []
    path.write_text('{"step": 1, "loss": 2.5}\n\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"metrics\.jsonl:2: malformed JSON"):
        read_metrics(path)
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"metrics\.jsonl:2: expected a JSON object, got list"):
        read_metrics(path)


def test_truncate_after_drops_later_steps_and_a_cut_off_line(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 5):
        log.write({"step": step, "loss": 1 / step, "lr": 1e-5, "note": "ü"})
    written = log.path.read_text().splitlines()
    with log.path.open("a") as fh:
        fh.write('{"step": 5, "lo')
    log.truncate_after(2)
    assert log.path.read_text().splitlines() == written[:2]
    assert [r["step"] for r in read_metrics(log.path)] == [1, 2]
