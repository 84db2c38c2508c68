"""The labelling app's JSON API fuzzed from its own OpenAPI schema with schemathesis: for every operation,
requests that fit the schema and requests that break it, sent as an admin (bearer token). No answer may
be a server error or carry a traceback, and the app still answers afterwards."""

from __future__ import annotations

import hypothesis
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode

from feedback_fixtures import *  # noqa: F403  (fixtures)
from feedback_fixtures import api_login

EXAMPLES_PER_MODE = 20  # per operation and generation mode: the whole test stays well under a minute
# Logging out would revoke the token every later request uses; it is exercised in test_feedback_api.
SKIPPED = {("POST", "/api/logout")}


def test_the_json_api_survives_schemathesis(fb_app, fb_client):
    admin = api_login(fb_client, "admin")
    items = [{"prompt": f"prompt {i}", "responses": ["a", "b", "c"]} for i in range(3)]
    assert fb_client.post("/api/rounds", json={"name": "r1", "overlap": 2}, headers=admin).status_code == 201
    assert fb_client.post("/api/rounds/r1/items", json={"items": items}, headers=admin).status_code == 201

    schema = schemathesis.openapi.from_dict(fb_app.openapi())
    schema.app = fb_app
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
                if response.status_code >= 500 or "Traceback" in response.text:
                    failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: "
                                    f"{response.text[:300]}")

            fuzz()
    total = sum(sent.values())
    print(f"schemathesis sent {total} requests to {len(sent)} operations")
    assert not failures, "\n".join(failures[:10])
    assert len(sent) >= 15 and total >= 15 * EXAMPLES_PER_MODE
    # Still up and still itself: the admin token works and the seeded round is intact.
    assert fb_client.get("/api/me", headers=admin).json()["username"] == "admin"
    progress = fb_client.get("/api/rounds/r1/progress", headers=admin)
    assert progress.status_code == 200 and progress.json()["items"] >= 3
