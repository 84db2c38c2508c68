"""The OpenAI-compatible server, driven by the official openai client over loopback with a tiny model."""

from __future__ import annotations

import asyncio
import time

import fastapi.routing
import httpx
import openai
import pytest
import torch
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from alignloop.serve.app import create_app
from alignloop.serve.backends import build_server
from alignloop.serve.errors import APIError
from alignloop.serve.metrics import ServeMetrics
from alignloop.serve.sampling import stream_request
from alignloop.serve.schemas import CompletionRequest
from alignloop.serve.server import Limits, Server, serve_in_thread

KEY = "test-secret"
PROMPTS = ["Repeat twice: red cat dog\n", "Repeat twice: big", "happy sad tree", "Repeat"]


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory("llama", hidden=32, layers=2, heads=4, vocab_size=300)


@pytest.fixture(scope="module")
def server(model_dir):
    limits = Limits(max_prompt_tokens=64, max_tokens=64, default_max_tokens=16, max_body_bytes=20_000)
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
    assert main(["serve", "--model", str(model_dir), "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err


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
