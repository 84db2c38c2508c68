"""The labelling app's JSON API fuzzed from its own OpenAPI schema with schemathesis: for every operation,
requests that fit the schema and requests that break it, sent as an admin (bearer token). No answer may
be a server error or carry a traceback, and the app still answers afterwards. Schemathesis's own checks
run on every answer too: status code, content type, headers and body as documented, requests that break
the schema refused, auth not ignored."""

from __future__ import annotations

import re

import hypothesis
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

from feedback_fixtures import *  # noqa: F403  (fixtures)
from feedback_fixtures import api_login

EXAMPLES_PER_MODE = 20  # per operation and generation mode: the whole test stays well under a minute
# Logging out would revoke the token every later request uses; it is exercised in test_feedback_api.
SKIPPED = {("POST", "/api/logout")}
# A frame line of a Python traceback. (Not the word "Traceback": the fuzzer sends such words itself, and an
# answer may echo them, e.g. "no round named ...".)
TRACEBACK_FRAME = re.compile(r'File "[^"]+", line [0-9]+, in ')


# A request that fits the schema may still break a rule of the service layer (min < max, a round name
# already taken, two different models), so it may be refused; a body over the size limit is refused with 413.
CHECKS = SchemathesisConfig.from_str("""
[checks.positive_data_acceptance]
enabled = false
[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]
""")


class CountingApp:
    """The ASGI app, counting the HTTP requests it receives (schemathesis's checks send some of their own)."""

    def __init__(self, app) -> None:
        self.app, self.requests = app, 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            self.requests += 1
        await self.app(scope, receive, send)


def test_the_json_api_survives_schemathesis(fb_app, fb_client):
    admin = api_login(fb_client, "admin")
    items = [{"prompt": f"prompt {i}", "responses": ["a", "b", "c"]} for i in range(3)]
    assert fb_client.post("/api/rounds", json={"name": "r1", "overlap": 2}, headers=admin).status_code == 201
    assert fb_client.post("/api/rounds/r1/items", json={"items": items}, headers=admin).status_code == 201

    schema = schemathesis.openapi.from_dict(fb_app.openapi(), config=CHECKS)
    counting = CountingApp(fb_app)
    schema.app = counting
    sent: dict[str, int] = {}
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) in SKIPPED:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            @hypothesis.settings(max_examples=EXAMPLES_PER_MODE, deadline=None, database=None, derandomize=True,
                                 phases=[Phase.explicit, Phase.generate],
                                 suppress_health_check=list(HealthCheck))
            def fuzz(case) -> None:
                response = case.call(headers=admin)
                sent[case.operation.label] = sent.get(case.operation.label, 0) + 1
                if response.status_code >= 500 or TRACEBACK_FRAME.search(response.text):
                    failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: "
                                    f"{response.text[:300]}")
                case.validate_response(response, headers=admin)

            try:
                fuzz()
            except hypothesis.errors.Unsatisfiable:
                # Nothing to break in an operation without parameters or body (/health, /api/me).
                assert mode is GenerationMode.NEGATIVE and not operation.body and not any(operation.iter_parameters())
    total = sum(sent.values())
    print(f"schemathesis sent {counting.requests} requests ({total} generated cases) to {len(sent)} operations")
    assert not failures, "\n".join(failures[:10])
    assert len(sent) >= 15 and total >= 15 * EXAMPLES_PER_MODE
    # Still up and still itself: /health answers, the admin token works and the seeded round is intact.
    assert fb_client.get("/health").json() == {"status": "ok"}
    assert fb_client.get("/api/me", headers=admin).json()["username"] == "admin"
    progress = fb_client.get("/api/rounds/r1/progress", headers=admin)
    assert progress.status_code == 200 and progress.json()["items"] >= 3
