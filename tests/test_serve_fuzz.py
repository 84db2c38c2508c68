"""``alignloop serve`` fuzzed from its own OpenAPI schema with schemathesis (``schema_fuzz``): a tiny causal
LM server and a tiny reward-model server, each with an API key, every operation with requests that fit the
schema and requests that break it. No answer may be a server error or carry a traceback, schemathesis's
own checks pass (including that the key is not ignored), and the server still answers and still generates
(or scores) afterwards."""

from __future__ import annotations

import copy
import json
from typing import Any

from fastapi.testclient import TestClient
from schemathesis.config import SchemathesisConfig

from alignloop.serve.app import create_app
from alignloop.serve.backends import build_server
from alignloop.serve.server import Limits
from schema_fuzz import fuzz_app

KEY = "fuzz-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "tiny"
EXAMPLES_PER_MODE = 25  # per operation and generation mode: each server's run stays well under a minute
# Small bounds, so that no request the fuzzer finds costs more than a few milliseconds of the tiny model
# (a prompt up to the model's 1,024 positions and up to 64 pairs to score: what hypothesis draws runs to
# hundreds of tokens and dozens of pairs).
LIMITS = dict(max_prompt_tokens=1000, max_tokens=8, default_max_tokens=4, max_body_bytes=20_000, max_score_pairs=64,
              max_n=3, max_top_logprobs=5)

# Fields where the schema allows what the server refuses before anything else runs: any model name but the
# served one (404), n over the limit, and the features it refuses by design (400, not supported: penalties,
# logit bias, tools, best_of != n, a suffix, a response format; stream options without a stream). Held to what it accepts (None where the
# field is nullable), so that most requests that fit the schema reach the engine: how many do otherwise
# depends on the cases hypothesis draws, which change with the tests run before in the same process.
FIXED = {"model": [NAME], "n": [1, 2, 3], "presence_penalty": [0], "frequency_penalty": [0], "logit_bias": [],
         "tools": [], "tool_choice": [], "parallel_tool_calls": [], "best_of": [], "suffix": [],
         "response_format": [], "stream_options": []}
# A message's content parts: only text parts are understood by a text model (other types get a 400).
TEXT_PART = {"type": "object", "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}},
             "required": ["type", "text"]}
# A request that fits the schema may still be refused by the server's limits (max_tokens, prompt length,
# n > 1, an empty stop string), so positive data may get a 400; a body over the size limit gets 413.
CHECKS = SchemathesisConfig.from_str("""
[checks.positive_data_acceptance]
enabled = false
[checks.negative_data_rejection]
expected-statuses = [400, 401, 404, 405, 406, 413, 415]
""")


def with_fixed_fields(openapi: dict[str, Any]) -> dict[str, Any]:
    """The schema with the FIXED request fields held to the values the server accepts, so that requests that fit
    the schema reach the engine or the scorer (breaking requests still send other values)."""
    fuzzed = copy.deepcopy(openapi)
    for name, schema in fuzzed["components"]["schemas"].items():
        fields = schema.get("properties", {})
        for field, values in FIXED.items():
            if name.endswith("Request") and field in fields:
                nullable = {"type": "null"} in fields[field].get("anyOf", [])  # ScoreRequest.model: None = served
                fields[field] = {"enum": [*values, None] if nullable else values}
                assert fields[field]["enum"], (name, field)
        if name == "ChatMessage":
            for branch in fields["content"]["anyOf"]:
                if branch.get("type") == "array":
                    branch["items"] = TEXT_PART
    return fuzzed


def fuzz_server(server, working: list[str]) -> TestClient:
    """Fuzz the app of ``server``, where the ``working`` operations must have answered some requests with
    200 (the fuzzing reached the model); returns a client of the same app for the checks afterwards (its
    engine is still running: schemathesis starts the app's lifespan and ends it when the test ends)."""
    app = create_app(server)
    report = fuzz_app(app, with_fixed_fields(app.openapi()), CHECKS, AUTH, EXAMPLES_PER_MODE)
    total = sum(report.cases.values())
    print(f"schemathesis sent {report.requests} requests ({total} generated cases) to {len(report.cases)} operations "
          f"of the {'reward-model' if server.scorer else 'generation'} server; answers: {sorted(report.statuses.items())}")
    assert not report.failures, "\n".join(report.failures[:10])
    assert len(report.cases) == 6 and total >= 6 * EXAMPLES_PER_MODE
    assert all(report.statuses[operation, 200] >= 5 for operation in working), report.statuses
    client = TestClient(app)  # no `with`: the lifespan (the engine) is schemathesis's
    assert client.get("/health", headers=AUTH).json() == {"status": "ok", "model": NAME}
    return client


def generation_server(tiny_model_factory):
    return build_server(str(tiny_model_factory("llama", hidden=32, layers=2, heads=4, vocab_size=300)),
                        api_key=KEY, limits=Limits(**LIMITS), max_batch=8, max_queue=16, served_model_name=NAME,
                        device="cpu")


def test_the_generation_server_survives_schemathesis(tiny_model_factory):
    client = fuzz_server(generation_server(tiny_model_factory), ["POST /v1/completions", "POST /v1/chat/completions"])
    done = client.post("/v1/completions", headers=AUTH,
                       json={"model": NAME, "prompt": "Repeat twice:", "max_tokens": 3, "ignore_eos": True})
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 3
    chat = client.post("/v1/chat/completions", headers=AUTH,
                       json={"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"


def test_the_reward_model_server_survives_schemathesis(reward_dir):
    server = build_server(str(reward_dir), api_key=KEY, limits=Limits(**LIMITS), served_model_name=NAME,
                          device="cpu")
    client = fuzz_server(server, ["POST /v1/score"])
    scored = client.post("/v1/score", headers=AUTH, json={"pairs": [{"prompt": "a", "response": "b"}] * 2})
    assert scored.status_code == 200 and len(scored.json()["scores"]) == 2


# ---------------------------------------------------------------- what fuzzing found, each a 500 before


def test_extreme_sampling_settings_are_greedy_and_unrepresentable_values_refused(tiny_model_factory):
    """top_p=5e-324 (0 in float32) and temperature=1e-300 (logits / T overflows) crashed the engine step,
    and with it every request in the batch; a seed past int64 (as OpenAI's; choice j uses seed + j) overflowed
    torch's generator; a lone
    UTF-16 surrogate (valid JSON, not Unicode) crashed the tokenizer."""
    body = {"model": NAME, "prompt": "Repeat twice:", "max_tokens": 6, "ignore_eos": True}
    with TestClient(create_app(generation_server(tiny_model_factory))) as client:
        greedy = client.post("/v1/completions", headers=AUTH, json={**body, "temperature": 0}).json()
        for extreme in ({"top_p": 5e-324}, {"temperature": 1e-300}, {"temperature": 5e-324, "top_p": 5e-324}):
            got = client.post("/v1/completions", headers=AUTH, json={**body, **extreme, "seed": 1})
            assert got.status_code == 200, (extreme, got.text)
            assert got.json()["choices"][0]["text"] == greedy["choices"][0]["text"], extreme
        refused = [({**body, "seed": 2**63}, "seed"), ({**body, "seed": -(2**63) - 1}, "seed"),
                   ({**body, "prompt": "red \ud800 cat"}, "prompt"), ({**body, "stop": ["\udfff"]}, "stop"),
                   ({"model": NAME, "messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content")]
        for request, param in refused:
            path = "/v1/chat/completions" if "messages" in request else "/v1/completions"
            # Sent as JSON text: a lone surrogate is legal JSON escaped, and unencodable unescaped.
            answer = client.post(path, headers={**AUTH, "Content-Type": "application/json"},
                                 content=json.dumps(request).encode())
            assert answer.status_code == 400 and answer.json()["error"]["param"] == param, (request, answer.text)
        assert client.post("/v1/completions", headers=AUTH, json={**body, "seed": 2**63 - 1}).status_code == 200
        assert client.get("/health", headers=AUTH).status_code == 200


def test_a_lone_surrogate_is_refused_by_the_reward_model_server(reward_dir):
    server = build_server(str(reward_dir), api_key=KEY, served_model_name=NAME, device="cpu")
    with TestClient(create_app(server)) as client:
        # (A prompt is a string or messages: a refusal names the union's first branch, pairs.0.prompt.str.)
        for pair, param in (({"prompt": "\ud83d", "response": "b"}, "pairs.0.prompt"),
                            ({"prompt": [{"role": "user", "content": "a\udc00"}], "response": "b"}, "pairs.0.prompt"),
                            ({"prompt": "a", "response": "\udc00"}, "pairs.0.response")):
            answer = client.post("/v1/score", headers={**AUTH, "Content-Type": "application/json"},
                                 content=json.dumps({"pairs": [pair]}).encode())
            assert answer.status_code == 400 and answer.json()["error"]["param"].startswith(param), (pair, answer.text)
