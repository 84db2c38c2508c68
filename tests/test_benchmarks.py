"""``alignloop eval --benchmarks``: lm-evaluation-harness on the loaded models, with the local tasks of
examples/benchmarks; scores in eval.json, the report and the model card; the same multiple-choice
accuracy as lm-eval's own ``hf`` model; user errors before any model is loaded."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from alignloop.cli import main
from alignloop.data import synthetic as S
from alignloop.errors import UserError
from alignloop.evaluate.benchmarks import benchmark_scores, offline_harness, task_manager
from alignloop.evaluate.report import ReportInputs, RoundInputs, build_report
from alignloop.models.export import model_card
from alignloop.models.load import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

TASKS = Path(__file__).resolve().parents[1] / "examples" / "benchmarks"
LIMIT = 40

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm-eval)")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model_factory):
    """``alignloop eval --benchmarks demo_world`` of a tiny policy against a baseline with other weights."""
    root = tmp_path_factory.mktemp("bench")
    policy = tiny_model_factory("llama")
    baseline = root / "baseline"
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(policy)).save_pretrained(baseline)
    load_tokenizer(str(policy)).save_pretrained(baseline)
    prompts = S.write_jsonl(root / "prompts.jsonl", S.eval_prompts(4))
    out = root / "eval"
    code = main(["eval", "--policy", str(policy), "--baseline", str(baseline), "--prompts", str(prompts),
                 "--benchmarks", "demo_world", "--benchmark-tasks", str(TASKS), "--benchmark-limit", str(LIMIT),
                 "--output", str(out), "generation.max_new_tokens=8", "batch_size=8"])
    assert code == 0
    return {"policy": policy, "out": out, "eval": json.loads((out / "eval.json").read_text())}


def test_eval_writes_both_models_benchmark_scores(evaluated):
    ev = evaluated["eval"]
    assert ev["benchmarks"]["tasks"] == ["demo_world"] and ev["benchmarks"]["limit"] == LIMIT
    assert ev["benchmarks"]["harness"] == f"lm-eval {lm_eval.__version__}"
    for name in ("policy", "baseline"):
        scores = ev["models"][name]["benchmarks"]
        assert set(scores) == {"demo_world_choice", "demo_world_count"}
        choice, count = scores["demo_world_choice"], scores["demo_world_count"]
        assert choice["samples"] == count["samples"] == LIMIT
        assert set(choice["metrics"]) == {"acc", "acc_norm"} and set(count["metrics"]) == {"exact_match,first-number"}
        for metric in [*choice["metrics"].values(), *count["metrics"].values()]:
            assert 0.0 <= metric["value"] <= 1.0 and metric["stderr"] >= 0.0
            # a mean of LIMIT right/wrong answers, and its standard error from the same counts
            right = round(metric["value"] * LIMIT)
            assert metric["value"] == pytest.approx(right / LIMIT)
            p = right / LIMIT
            assert metric["stderr"] == pytest.approx((p * (1 - p) / (LIMIT - 1)) ** 0.5)
    # two different random models do not answer 40 four-way questions identically
    pol, base = (ev["models"][m]["benchmarks"]["demo_world_choice"]["metrics"] for m in ("policy", "baseline"))
    assert (pol["acc"]["value"], pol["acc_norm"]["value"]) != (base["acc"]["value"], base["acc_norm"]["value"])


def test_in_process_accuracy_equals_lm_eval_hf_model(evaluated):
    """lm-eval loading the policy's folder itself gets the very accuracy our in-process HFLM got."""
    from lm_eval.tasks import TaskManager

    with offline_harness():
        results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={evaluated['policy']}", device="cpu",
                                          batch_size=8, tasks=["demo_world_choice"], limit=LIMIT, log_samples=False,
                                          task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))
    theirs = benchmark_scores(results)["demo_world_choice"]["metrics"]
    ours = evaluated["eval"]["models"]["policy"]["benchmarks"]["demo_world_choice"]["metrics"]
    assert ours == theirs


def test_report_and_model_card_show_the_scores(evaluated, tmp_path):
    ev = evaluated["eval"]
    html = build_report(ReportInputs("bench", rounds=[RoundInputs("round-1", eval=evaluated["out"])]),
                        tmp_path / "report.html").read_text()
    table = html.split('data-table="benchmarks"')[1].split("</table>")[0]
    assert "SFT model" in table and "policy, round-1" in table and 'data-plot="benchmarks"' in html
    for name in ("baseline", "policy"):
        for task, score in ev["models"][name]["benchmarks"].items():
            for metric, m in score["metrics"].items():
                cell = f"{m['value']:.3f} ± {m['stderr']:.3f}"
                assert re.search(rf"<td>{re.escape(task)}</td><td>{re.escape(metric)}</td>.*{re.escape(cell)}", table)

    card = model_card("m", Path("m"), {"stage": "ppo"}, {"eval": ev}, reward=False)
    acc = ev["models"]["policy"]["benchmarks"]["demo_world_choice"]["metrics"]["acc"]
    base_acc = ev["models"]["baseline"]["benchmarks"]["demo_world_choice"]["metrics"]["acc"]
    assert "| task | metric | policy | baseline |" in card
    assert (f"| demo_world_choice | acc | {acc['value']:.6g} ± {acc['stderr']:.6g} | "
            f"{base_acc['value']:.6g} ± {base_acc['stderr']:.6g} |") in card
    assert f"lm-eval {lm_eval.__version__}, at most {LIMIT} examples per task" in card


def test_an_oracle_scores_full_marks_on_the_local_tasks():
    """The task files themselves: prompts carry the question (the count task three worked examples
    first), the choices and targets come from the data, and the first-number filter reads "7." as 7."""
    from lm_eval.api.model import LM

    choice = {i["question"]: i["choices"][i["answer"]] for i in S.benchmark_choice_items(200)}
    count = {i["question"]: i["answer"] for i in S.benchmark_count_items(200)}
    seen: list[str] = []

    class Oracle(LM):
        def loglikelihood(self, requests):
            return [(0.0 if choice[ctx] == cont.strip() else -1.0, False) for ctx, cont in (r.args for r in requests)]

        def generate_until(self, requests):
            seen.extend(r.args[0] for r in requests)
            return [f" {count[r.args[0].rsplit('Question: ', 1)[1].removesuffix(chr(10) + 'Answer:')]}. Yes."
                    for r in requests]

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

    with offline_harness():
        scores = benchmark_scores(lm_eval.simple_evaluate(model=Oracle(), tasks=["demo_world"], limit=10,
                                                          task_manager=task_manager(["demo_world"], str(TASKS))))
    assert scores["demo_world_choice"]["metrics"]["acc"]["value"] == 1.0
    assert scores["demo_world_count"]["metrics"]["exact_match,first-number"]["value"] == 1.0
    assert all(p.count("Question: ") == 4 and p.count("Answer:") == 4 for p in seen) and len(seen) == 10


def test_benchmark_scores_keep_values_stderrs_and_filters():
    results = {"results": {"t": {"alias": "t", "sample_len": 3, "acc,none": 0.5, "acc_stderr,none": 0.1,
                                 "exact_match,strict": 0.25, "exact_match_stderr,strict": "N/A"}},
               "n-samples": {"t": {"original": 10, "effective": 3}}, "versions": {"t": 2.0}}
    assert benchmark_scores(results) == {"t": {"samples": 3, "version": 2.0, "metrics": {
        "acc": {"value": 0.5, "stderr": 0.1}, "exact_match,strict": {"value": 0.25, "stderr": None}}}}


def test_unknown_task_is_a_one_line_error_before_any_model_loads(tmp_path, capsys):
    prompts = S.write_jsonl(tmp_path / "p.jsonl", S.eval_prompts(2))
    code = main(["eval", "--policy", str(tmp_path / "no-such-model"), "--prompts", str(prompts),
                 "--benchmarks", "demo_world_choise", "--benchmark-tasks", str(TASKS), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "'demo_world_choise'" in err and "demo_world_choice" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()
    with pytest.raises(UserError, match="not a folder"):
        task_manager(["demo_world"], str(tmp_path / "missing"))


def test_missing_harness_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(UserError, match=re.escape("pip install 'alignloop[benchmarks]'")):
        task_manager(["demo_world"], str(TASKS))


def test_harness_runs_offline_and_restores_the_settings(monkeypatch):
    # as in a process where the libraries were imported online (the tests' conftest sets HF_HUB_OFFLINE)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    before = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    with offline_harness():
        assert huggingface_hub.is_offline_mode() and datasets.config.HF_HUB_OFFLINE
        with pytest.raises(ConnectionError):  # a hub data set fails at once, without a request
            datasets.load_dataset("EleutherAI/no-such-dataset")
    assert (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE) == before


def test_shipped_task_data_is_the_generators_output(tmp_path):
    written = S.write_benchmark_data(tmp_path)
    for path in written.values():
        assert path.read_bytes() == (TASKS / path.name).read_bytes(), f"regenerate {TASKS / path.name}"
