"""The labelling app's JSON API fuzzed from its own OpenAPI schema with schemathesis (``schema_fuzz``): for
every operation, requests that fit the schema and requests that break it, sent as an admin (bearer token).
No answer may be a server error or carry a traceback, schemathesis's own checks pass, and the app still
answers afterwards."""

from __future__ import annotations

from schemathesis.config import SchemathesisConfig

from feedback_fixtures import *  # noqa: F403  (fixtures)
from feedback_fixtures import api_login
from schema_fuzz import fuzz_app

EXAMPLES_PER_MODE = 20  # per operation and generation mode: the whole test stays well under a minute
# Logging out would revoke the token every later request uses; it is exercised in test_feedback_api.
SKIPPED = {("POST", "/api/logout")}


# A request that fits the schema may still break a rule of the service layer (min < max, a round name
# already taken, two different models), so it may be refused; a body over the size limit is refused with 413.
CHECKS = SchemathesisConfig.from_str("""
[checks.positive_data_acceptance]
enabled = false
[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]
""")


def test_the_json_api_survives_schemathesis(fb_app, fb_client):
    admin = api_login(fb_client, "admin")
    items = [{"prompt": f"prompt {i}", "responses": ["a", "b", "c"]} for i in range(3)]
    assert fb_client.post("/api/rounds", json={"name": "r1", "overlap": 2}, headers=admin).status_code == 201
    assert fb_client.post("/api/rounds/r1/items", json={"items": items}, headers=admin).status_code == 201

    report = fuzz_app(fb_app, fb_app.openapi(), CHECKS, admin, EXAMPLES_PER_MODE, SKIPPED)
    total = sum(report.cases.values())
    print(f"schemathesis sent {report.requests} requests ({total} generated cases) to {len(report.cases)} operations")
    assert not report.failures, "\n".join(report.failures[:10])
    assert len(report.cases) >= 15 and total >= 15 * EXAMPLES_PER_MODE
    # Still up and still itself: /health answers, the admin token works and the seeded round is intact.
    assert fb_client.get("/health").json() == {"status": "ok"}
    assert fb_client.get("/api/me", headers=admin).json()["username"] == "admin"
    progress = fb_client.get("/api/rounds/r1/progress", headers=admin)
    assert progress.status_code == 200 and progress.json()["items"] >= 3
