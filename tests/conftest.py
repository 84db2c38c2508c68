"""Shared fixtures: tiny models built on the fly, small generated data sets, the shared real data."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ALIGNLOOP_CACHE", str(Path.home() / ".cache" / "alignloop"))

try:
    import transformers

    transformers.utils.logging.disable_progress_bar()
except ImportError:  # pragma: no cover
    pass

WORDS = "red blue green cat dog bird runs jumps sleeps big small happy sad tree river stone".split()


def shared_data_dir() -> Path | None:
    env = os.environ.get("ALIGNLOOP_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


def pytest_collection_modifyitems(config, items):
    """Longest tests first (``@pytest.mark.slow(seconds=N)``, measured on 2 cores), dealt alternately to
    the two halves of the order. xdist hands each of the two workers a consecutive half and ``--dist
    worksteal`` lets an idle worker take tests from the end of the other's, so both workers start on
    long tests; sorted without dealing, the longest few all fell to one worker's half and ran one after
    another."""

    def expected_seconds(item) -> float:
        mark = item.get_closest_marker("slow")
        return mark.kwargs.get("seconds", 1.0) if mark else 0.0

    longest_first = sorted(items, key=expected_seconds, reverse=True)
    items[:] = longest_first[0::2] + longest_first[1::2]


PEER_BENCH = Path(os.environ.get("ALIGNLOOP_PEER_BENCH", REPO.parent / "shared" / "peer-bench"))


@pytest.fixture(scope="module")
def peer_bench_fixtures(tmp_path_factory) -> Path:
    """A folder for the bench scripts' ``--fixtures`` built like ../shared/peer-bench's: a tiny Llama whose
    tokenizer is trained on the workload's own text (which keeps the prompts as short as the real
    fixtures'); skips where the peer folder is absent."""
    if not (PEER_BENCH / "synth.py").exists():
        pytest.skip("the peer benchmark folder (../shared/peer-bench) is not present")
    sys.path.insert(0, str(PEER_BENCH))
    import synth

    from alignloop.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("fixtures")
    build_tiny_model(root / "llama-tiny", synth.tokenizer_corpus(2000), vocab_size=1000, hidden=32, layers=2,
                     heads=2)
    return root


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny
    models run fastest on one, and on a shared CPU two threads spin-wait each other badly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is not present in this checkout")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def repeat_task(n: int, seed: int = 0) -> list[dict]:
    """A small instruction task a tiny model learns in a few dozen steps: repeat two words twice."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, c = rng.choice(WORDS), rng.choice(WORDS), rng.choice(WORDS)
        rows.append({"prompt": f"Repeat twice: {a} {b} {c}\n", "completion": f"{a} {b} {c} {a} {b} {c}"})
    return rows


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """build(arch="llama", **sizes) -> folder of a tiny random causal LM with a local tokenizer (cached)."""
    from alignloop.models.tiny import build_tiny_model

    built: dict[tuple, Path] = {}
    texts = [r["prompt"] + r["completion"] for r in repeat_task(400, seed=123)]

    def build(arch: str = "llama", hidden: int = 64, layers: int = 2, heads: int = 4, vocab_size: int = 300) -> Path:
        key = (arch, hidden, layers, heads, vocab_size)
        if key not in built:
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            built[key] = build_tiny_model(out, texts, arch=arch, hidden=hidden, layers=layers, heads=heads,
                                          vocab_size=vocab_size)
        return built[key]

    return build


@pytest.fixture
def tiny_model(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture
def sft_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "sft.jsonl", repeat_task(400))


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tiny_model_factory) -> Path:
    """A reward-model folder as the rm stage writes it: sequence classifier + alignloop.json (stage rm),
    with normalisation statistics that differ from the identity."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from alignloop.models.load import save_model

    base = tiny_model_factory("llama", hidden=32)
    config = AutoConfig.from_pretrained(base, num_labels=1)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # an untrained head would score everything alike
    tok = AutoTokenizer.from_pretrained(base)
    out = tmp_path_factory.mktemp("rm") / "model"
    save_model(model, tok, out, meta={"stage": "rm", "criteria": ["reward"], "criteria_weights": [1.0],
                                      "normalization": {"mean": 0.25, "std": 2.0}, "max_seq_len": 256})
    return out
