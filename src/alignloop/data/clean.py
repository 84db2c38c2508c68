"""Cleaning rules, each switchable in ``data.clean`` and counted in the report saved to the run folder."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from html.parser import HTMLParser
from typing import Any

from datasketch import MinHash, MinHashLSH

from alignloop.config import CleanConfig
from alignloop.data.io import Record

# Fields whose strings are text to clean. Labels, roles and tag sequences are left as they are.
TEXT_FIELDS = ("prompt", "completion", "text", "messages", "chosen", "rejected", "response", "responses")

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u2028\u2029\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in ("br", "p", "div", "li", "tr"):
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def strip_html(text: str) -> str:
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


def _clean_text(text: str, cfg: CleanConfig, counts: Counter) -> str:
    out = text
    if cfg.unicode_form != "none":
        norm = unicodedata.normalize(cfg.unicode_form, out)
        counts["unicode_normalized"] += norm != out
        out = norm
    if cfg.strip_control:
        # Keep \n, \r, \t: they carry layout in code and dialogues.
        new = _CONTROL.sub("", out)
        counts["control_chars_removed"] += new != out
        out = new
    if cfg.strip_html and "<" in out:
        new = strip_html(out)
        counts["html_stripped"] += new != out
        out = new
    if cfg.normalize_whitespace:
        new = out.replace("\r\n", "\n").replace("\r", "\n")
        new = "\n".join(_SPACES.sub(" ", ln).strip() for ln in new.split("\n"))
        new = _BLANK_LINES.sub("\n\n", new).strip()
        counts["whitespace_normalized"] += new != out
        out = new
    return out


def _map_strings(value: Any, fn) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    if isinstance(value, dict):
        # In a message only the content is text; the role is a label.
        return {k: (_map_strings(v, fn) if k == "content" else v) for k, v in value.items()}
    return value


def record_text(data: dict) -> str:
    """All text of a record joined, for length checks and duplicate keys."""
    parts: list[str] = []

    def collect(v: Any) -> None:
        if isinstance(v, str):
            parts.append(v)
        elif isinstance(v, list):
            for x in v:
                collect(x)
        elif isinstance(v, dict):
            collect(v.get("content"))

    for f in TEXT_FIELDS:
        collect(data.get(f))
    return "\n".join(parts)


def _shingles(text: str, n: int = 3) -> set[bytes]:
    words = re.findall(r"\w+", text.lower())
    if len(words) < n:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)}


def clean_records(records: list[Record], cfg: CleanConfig) -> tuple[list[Record], dict]:
    """Apply the configured rules in order; returns the kept records and the per-rule counts."""
    counts: Counter = Counter()
    kept: list[Record] = []
    seen: set[str] = set()
    lsh = None
    if cfg.dedupe_near:
        lsh = MinHashLSH(threshold=cfg.near_threshold, num_perm=64)

    for rec in records:
        data = dict(rec.data)
        for f in TEXT_FIELDS:
            if f in data:
                data[f] = _map_strings(data[f], lambda s: _clean_text(s, cfg, counts))
        text = record_text(data)
        if cfg.drop_empty and not text.strip():
            counts["dropped_empty"] += 1
            continue
        if len(text) < cfg.min_chars:
            counts["dropped_too_short"] += 1
            continue
        if cfg.max_chars is not None and len(text) > cfg.max_chars:
            counts["dropped_too_long"] += 1
            continue
        if cfg.dedupe_exact:
            key = hashlib.sha1(repr(sorted((k, repr(v)) for k, v in data.items())).encode()).hexdigest()
            if key in seen:
                counts["dropped_exact_duplicates"] += 1
                continue
            seen.add(key)
        if lsh is not None:
            mh = MinHash(num_perm=64, seed=1)
            mh.update_batch(list(_shingles(text)))
            if lsh.query(mh):
                counts["dropped_near_duplicates"] += 1
                continue
            lsh.insert(str(len(kept)), mh)
        kept.append(Record(data, rec.where))

    report = {"records_in": len(records), "records_out": len(kept), **dict(sorted(counts.items()))}
    return kept, report
