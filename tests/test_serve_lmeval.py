"""lm-evaluation-harness against ``alignloop serve``: its ``local-completions`` model at its default settings
(token-id prompts, in batches) runs the local multiple-choice and generate-until tasks of examples/benchmarks
and gets what lm-eval's own ``hf`` model gets on the same folder in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignloop.evaluate.benchmarks import benchmark_scores, offline_harness, task_manager
from alignloop.serve.app import create_app
from alignloop.serve.backends import build_server
from alignloop.serve.server import serve_in_thread

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm-eval)")
pytest.importorskip("tenacity", reason="lm-eval's API models need its [api] extra (pip install 'lm-eval[api]')")

TASKS = Path(__file__).resolve().parents[1] / "examples" / "benchmarks"
TASK_NAMES = ["demo_world_choice", "demo_world_count"]
LIMIT = 20
BATCH = 4
KEY = "lmeval-secret"


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def served(model_dir):
    srv = build_server(str(model_dir), api_key=KEY, served_model_name="tiny", device="cpu", max_batch=8)
    with serve_in_thread(create_app(srv)) as url:
        yield srv, url


def evaluate(model: str, model_args: str, **kwargs) -> dict:
    with offline_harness():
        return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASK_NAMES, limit=LIMIT,
                                       log_samples=True, task_manager=task_manager(TASK_NAMES, str(TASKS)), **kwargs)


def responses(results: dict, task: str) -> list:
    """Each example's raw answers, by document: (log-likelihood, is greedy) per choice, or the generated text."""
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def completions_answered(srv, status: str) -> float:
    value = srv.metrics.registry.get_sample_value("alignloop_http_requests_total",
                                                  {"route": "/v1/completions", "status": status})
    return value or 0.0


# lm-eval's API models send token ids without a BOS unless add_bos_token=True, while its hf model (and
# `alignloop eval --benchmarks`) lets the tokenizer add it: each pairing below scores the same tokens.
@pytest.mark.parametrize(("served_args", "hf_args"), [("", ",add_bos_token=False"), (",add_bos_token=True", "")],
                         ids=["lm-eval-defaults", "with-bos"])
def test_local_completions_scores_like_lm_evals_hf_model(served, model_dir, monkeypatch, served_args, hf_args):
    srv, url = served
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # what local-completions sends as its bearer token
    before = completions_answered(srv, "200")
    theirs = evaluate("local-completions", f"base_url={url}/v1/completions,model=tiny,tokenizer={model_dir},"
                      f"num_concurrent=1,max_retries=1,tokenized_requests=True,batch_size={BATCH}{served_args}")
    # 80 log-likelihood requests (20 questions x 4 choices) and 20 generations, BATCH prompts per request
    assert completions_answered(srv, "200") - before == (LIMIT * 4 + LIMIT) / BATCH
    ours = evaluate("hf", f"pretrained={model_dir}{hf_args}", device="cpu", batch_size=BATCH)

    served_scores, hf_scores = benchmark_scores(theirs), benchmark_scores(ours)
    choice, count = served_scores["demo_world_choice"], served_scores["demo_world_count"]
    assert choice["samples"] == count["samples"] == LIMIT
    assert set(choice["metrics"]) == {"acc", "acc_norm"} and set(count["metrics"]) == {"exact_match,first-number"}
    for metric in [*choice["metrics"].values(), *count["metrics"].values()]:
        assert isinstance(metric["value"], float) and 0.0 <= metric["value"] <= 1.0
    assert served_scores["demo_world_choice"] == hf_scores["demo_world_choice"]
    assert served_scores["demo_world_count"] == hf_scores["demo_world_count"]

    # Beneath the accuracy: every choice's log-likelihood (the echoed prompt log-probs) within 1e-4, the
    # same greedy flags (the top log-probs), and the same greedy generations cut at the same stop strings.
    for served_example, hf_example in zip(responses(theirs, "demo_world_choice"),
                                          responses(ours, "demo_world_choice"), strict=True):
        assert [r[0][1] for r in served_example] == [r[0][1] for r in hf_example]
        assert [r[0][0] for r in served_example] == pytest.approx([r[0][0] for r in hf_example], abs=1e-4)
    assert responses(theirs, "demo_world_count") == responses(ours, "demo_world_count")
