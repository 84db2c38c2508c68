"""The feedback JSON API and HTML forms through FastAPI's test client: authentication on every route,
roles, other people's tasks, CSRF, hashed credentials, size limits, the queue with overlap, labels,
reviews, side-by-side votes, invites and escaping."""

from __future__ import annotations

import json
import re
import typing

import fastapi.routing
import pytest
from sqlalchemy import select

from alignloop.feedback import tasks
from alignloop.feedback.db import ROLES, Label, Prompt, Token, User
from alignloop.feedback.export import FORMATS
from alignloop.feedback.web.app import create_app
from alignloop.feedback.web.deps import require
from alignloop.feedback.web.schemas import ExportFormat
from feedback_fixtures import *  # noqa: F403  (fixtures)
from feedback_fixtures import PASSWORD, api_login

PUBLIC = {("POST", "/api/login"), ("POST", "/api/invites/accept"), ("GET", "/login"), ("POST", "/login"),
          ("GET", "/invite/{token}"), ("POST", "/invite/{token}"), ("GET", "/static/app.js"), ("GET", "/health")}


def app_routes(app) -> list:
    """Every route of the app. FastAPI 0.137 and later keep included routers as a tree in ``app.routes``;
    ``iter_route_contexts`` flattens it (0.137.2 and later); older versions list the routes themselves."""
    flatten = getattr(fastapi.routing, "iter_route_contexts", None)
    return list(flatten(app.routes)) if flatten is not None else list(app.routes)


def make_round(client, admin, name="r1", overlap=2, items=None, kind="candidate"):
    r = client.post("/api/rounds", json={"name": name, "overlap": overlap}, headers=admin)
    assert r.status_code == 201, r.text
    items = items or [{"prompt": f"prompt {i}", "responses": [f"p{i} a", f"p{i} b", f"p{i} c"]} for i in range(3)]
    r = client.post(f"/api/rounds/{name}/items", json={"items": items, "kind": kind}, headers=admin)
    assert r.status_code == 201, r.text


def label(client, headers, task, **extra):
    ids = [c["id"] for c in task["candidates"]]
    body = {"ranking": ids, **extra}
    return client.post(f"/api/tasks/{task['task_id']}/label", json=body, headers=headers)


def browser_login(client, username):
    page = client.get("/login")
    token = re.search(r'name="login_csrf" value="([^"]+)"', page.text).group(1)
    r = client.post("/login", data={"username": username, "password": PASSWORD, "login_csrf": token, "next": "/"},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    home = client.get("/")
    return re.search(r'name="csrf_token" value="([^"]+)"', home.text).group(1)


def test_every_route_refuses_anonymous_requests(fb_app, fb_client):
    checked = 0
    for route in app_routes(fb_app):
        for method in sorted(getattr(route, "methods", None) or []):
            if method == "HEAD" or (method, route.path) in PUBLIC:
                continue
            path = re.sub(r"\{[a-z_]+\}", "1", route.path)
            r = fb_client.request(method, path, follow_redirects=False)
            if route.path.startswith("/api/"):
                assert r.status_code == 401, (method, route.path, r.status_code)
            else:
                assert r.status_code == 303 and r.headers["location"].startswith("/login"), (method, route.path)
            checked += 1
    assert checked >= 30


def test_roles_are_enforced_on_the_server(fb_client):
    admin, rev, ann = (api_login(fb_client, u) for u in ("admin", "rev", "ann1"))
    make_round(fb_client, admin)
    admin_only = [("POST", "/api/rounds", {"name": "x"}), ("POST", "/api/rounds/r1/items", {"items": []}),
                  ("GET", "/api/rounds/r1/progress", None), ("GET", "/api/rounds/r1/agreement", None),
                  ("GET", "/api/rounds/r1/export", None), ("POST", "/api/invites", {"username": "eve"}),
                  ("GET", "/api/users", None)]
    for who in (ann, rev):
        for method, path, body in admin_only:
            r = fb_client.request(method, path, json=body, headers=who)
            assert r.status_code == 403, (method, path)
    for method, path, body in [("POST", "/api/rounds/r1/review/next", None),
                               ("POST", "/api/reviews/1", {"decision": "approve"})]:
        assert fb_client.request(method, path, json=body, headers=ann).status_code == 403
    assert fb_client.post("/api/rounds/r1/review/next", headers=rev).status_code == 204
    assert fb_client.post("/api/rounds/r1/next", headers=rev).status_code == 200  # reviewers may label
    for method, path, body in admin_only[2:4]:
        assert fb_client.request(method, path, json=body, headers=admin).status_code == 200
    assert fb_client.get("/api/me", headers={"Authorization": "Bearer forged"}).status_code == 401


def test_html_admin_pages_refuse_annotators(fb_client):
    browser_login(fb_client, "ann1")
    for path in ("/admin", "/admin/rounds/r1", "/admin/rounds/r1/export"):
        assert fb_client.get(path).status_code == 403
    assert fb_client.get("/rounds/r1/review").status_code == 403


def test_other_annotators_task_is_refused(fb_client):
    admin, a1, a2 = (api_login(fb_client, u) for u in ("admin", "ann1", "ann2"))
    make_round(fb_client, admin)
    task = fb_client.post("/api/rounds/r1/next", headers=a1).json()
    assert fb_client.get(f"/api/tasks/{task['task_id']}", headers=a2).status_code == 403
    assert label(fb_client, a2, task).status_code == 403
    assert fb_client.get("/api/tasks/999", headers=a2).status_code == 404
    assert label(fb_client, a1, task).status_code == 200


def test_csrf_is_required_for_cookie_sessions(fb_client):
    admin = api_login(fb_client, "admin")
    make_round(fb_client, admin)
    csrf = browser_login(fb_client, "ann1")
    # JSON API through the cookie: the X-CSRF-Token header is required.
    assert fb_client.post("/api/rounds/r1/next").status_code == 403
    assert fb_client.post("/api/rounds/r1/next", headers={"X-CSRF-Token": "0" * 64}).status_code == 403
    task = fb_client.post("/api/rounds/r1/next", headers={"X-CSRF-Token": csrf}).json()
    # HTML form without / with a wrong csrf_token field.
    form = {"task_id": task["task_id"], **{f"rank_{c['id']}": i + 1 for i, c in enumerate(task["candidates"])}}
    assert fb_client.post("/rounds/r1/label", data=form).status_code == 403
    assert fb_client.post("/rounds/r1/label", data={**form, "csrf_token": "x"}).status_code == 403
    assert fb_client.post("/logout", data={}).status_code == 403
    r = fb_client.post("/rounds/r1/label", data={**form, "csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303
    # Login form without the double-submit token.
    anon = fb_client.__class__(fb_client.app)
    r = anon.post("/login", data={"username": "ann1", "password": PASSWORD, "login_csrf": "guess"})
    assert r.status_code == 403


def test_credentials_are_stored_hashed(fb_client, fb_sessions):
    headers = api_login(fb_client, "ann1")
    secret = headers["Authorization"].split()[1]
    with fb_sessions() as db:
        user = db.scalar(select(User).where(User.username == "ann1"))
        assert user.password_hash.startswith("$argon2") and PASSWORD not in user.password_hash
        hashes = db.scalars(select(Token.token_hash)).all()
        assert hashes and secret not in hashes and all(len(h) == 64 for h in hashes)
    assert fb_client.post("/api/login", json={"username": "ann1", "password": "wrong-password"}).status_code == 401
    assert fb_client.post("/api/login", json={"username": "nobody", "password": PASSWORD}).status_code == 401
    fb_client.post("/api/logout", headers=headers)
    assert fb_client.get("/api/me", headers=headers).status_code == 401


def test_request_sizes_and_text_lengths_are_bounded(fb_client):
    admin, ann = api_login(fb_client, "admin"), api_login(fb_client, "ann1")
    make_round(fb_client, admin)
    big = fb_client.post("/api/rounds/r1/items", content=b"x" * (9 * 1024 * 1024),
                         headers={**admin, "content-type": "application/json"})
    assert big.status_code == 413

    def chunks():  # no Content-Length: the limit is counted while the body streams in
        for _ in range(9):
            yield b" " * (1024 * 1024)

    streamed = fb_client.post("/api/rounds", content=chunks(), headers={**admin, "content-type": "application/json"})
    assert streamed.status_code == 413
    long_prompt = fb_client.post("/api/rounds/r1/items", json={"items": [{"prompt": "p" * 20_001,
                                                                          "responses": ["a", "b"]}]}, headers=admin)
    assert long_prompt.status_code == 422
    task = fb_client.post("/api/rounds/r1/next", headers=ann).json()
    assert label(fb_client, ann, task, comment="c" * 2001).status_code == 422
    assert fb_client.post("/api/login", json={"username": "u" * 65, "password": "x"}).status_code == 422


def test_overlap_limits_assignment_and_skip_frees_the_slot(fb_client, fb_sessions):
    admin = api_login(fb_client, "admin")
    make_round(fb_client, admin, overlap=2, items=[{"prompt": "only", "responses": ["a", "b"]}])
    a1, a2, a3 = (api_login(fb_client, u) for u in ("ann1", "ann2", "ann3"))
    t1 = fb_client.post("/api/rounds/r1/next", headers=a1).json()
    assert fb_client.post("/api/rounds/r1/next", headers=a1).json()["task_id"] == t1["task_id"]  # same open task
    t2 = fb_client.post("/api/rounds/r1/next", headers=a2).json()
    assert fb_client.post("/api/rounds/r1/next", headers=a3).status_code == 204  # both slots taken
    assert fb_client.post(f"/api/tasks/{t2['task_id']}/label", json={"skip": True}, headers=a2).status_code == 200
    t3 = fb_client.post("/api/rounds/r1/next", headers=a3).json()  # the skipped slot went back
    assert t3["prompt"] == "only"
    assert fb_client.post("/api/rounds/r1/next", headers=a2).status_code == 204  # never the same item twice
    for h, t in ((a1, t1), (a3, t3)):
        assert label(fb_client, h, t).status_code == 200
    with fb_sessions() as db:
        assert db.scalar(select(Prompt.assigned)) == 2


def test_label_validation_and_idempotent_retry(fb_client, fb_sessions):
    admin, ann = api_login(fb_client, "admin"), api_login(fb_client, "ann1")
    make_round(fb_client, admin)
    task = fb_client.post("/api/rounds/r1/next", headers=ann).json()
    ids = [c["id"] for c in task["candidates"]]
    url = f"/api/tasks/{task['task_id']}/label"
    assert fb_client.post(url, json={"ranking": ids[:2]}, headers=ann).status_code == 422
    assert fb_client.post(url, json={"ranking": ids, "ratings": {str(ids[0]): {"relevance": 9}}},
                          headers=ann).status_code == 422
    assert fb_client.post(url, json={"ranking": ids, "ratings": {str(ids[0]): {"tone": 3}}},
                          headers=ann).status_code == 422
    assert fb_client.post(url, json={"ranking": ids, "flags": [{"candidate_id": ids[0], "kind": "boring"}]},
                          headers=ann).status_code == 422
    body = {"ranking": ids, "ratings": {str(ids[0]): {"relevance": 6}},
            "flags": [{"candidate_id": ids[1], "kind": "wrong"}], "comment": "ok"}
    first = fb_client.post(url, json=body, headers=ann).json()
    again = fb_client.post(url, json=body, headers=ann).json()
    assert first["created"] and not again["created"] and first["label_id"] == again["label_id"]
    with fb_sessions() as db:
        stored = db.scalars(select(Label)).all()
        assert len(stored) == 1 and stored[0].ranking == ids
        assert [(r.candidate_id, r.criterion, r.value) for r in stored[0].ratings] == [(ids[0], "relevance", 6.0)]
        assert [(f.candidate_id, f.kind) for f in stored[0].flags] == [(ids[1], "wrong")]


def test_invite_link_works_once(fb_client):
    admin = api_login(fb_client, "admin")
    r = fb_client.post("/api/invites", json={"username": "newbie", "role": "reviewer"}, headers=admin).json()
    assert r["url"].endswith(r["token"])
    assert fb_client.post("/api/invites/accept", json={"token": r["token"], "password": "short"}).status_code == 422
    ok = fb_client.post("/api/invites/accept", json={"token": r["token"], "password": "a-long-password"})
    assert ok.status_code == 200 and ok.json()["user"]["role"] == "reviewer"
    again = fb_client.post("/api/invites/accept", json={"token": r["token"], "password": "another-password"})
    assert again.status_code == 401
    assert fb_client.get(f"/invite/{r['token']}").status_code == 404
    assert api_login(fb_client, "newbie", "a-long-password")
    assert fb_client.post("/api/invites", json={"username": "newbie"}, headers=admin).status_code == 422


def test_review_decisions_export_as_pairs(fb_client):
    admin, rev = api_login(fb_client, "admin"), api_login(fb_client, "rev")
    # Two lines of a PPO run's samples.jsonl: same prompt, separate items.
    items = [{"step": 3, "prompt": "ppo prompt", "response": "good sample"},
             {"step": 3, "prompt": "ppo prompt", "response": "bad sample"}]
    make_round(fb_client, admin, overlap=1, items=items, kind="policy")
    first = fb_client.post("/api/rounds/r1/review/next", headers=rev).json()
    assert first["response"] == "good sample" and first["model"] == "ppo-step-3"
    assert fb_client.post(f"/api/reviews/{first['sample_id']}", json={"decision": "approve"},
                          headers=rev).status_code == 200
    second = fb_client.post("/api/rounds/r1/review/next", headers=rev).json()
    no_reason = fb_client.post(f"/api/reviews/{second['sample_id']}", json={"decision": "flag"}, headers=rev)
    assert no_reason.status_code == 422
    assert fb_client.post(f"/api/reviews/{second['sample_id']}", json={"decision": "flag", "reason": "rude"},
                          headers=rev).status_code == 200
    assert fb_client.post("/api/rounds/r1/review/next", headers=rev).status_code == 204
    pairs = fb_client.get("/api/rounds/r1/export?format=pairs", headers=admin).text.splitlines()
    assert pairs == ['{"prompt": "ppo prompt", "chosen": "good sample", "rejected": "bad sample", "source": "review"}']
    unpaired = fb_client.get("/api/rounds/r1/export?format=unpaired", headers=admin).text.splitlines()
    assert [json.loads(line) for line in unpaired] == [
        {"prompt": "ppo prompt", "completion": "good sample", "label": True, "source": "review"},
        {"prompt": "ppo prompt", "completion": "bad sample", "label": False, "source": "review"}]


def test_blind_side_by_side_win_rate(fb_client):
    admin, ann = api_login(fb_client, "admin"), api_login(fb_client, "ann1")
    items = [{"prompt": f"q{i}", "responses": [{"text": f"A{i}", "model": "A"}, {"text": f"B{i}", "model": "B"}]}
             for i in range(6)]
    make_round(fb_client, admin, items=items)
    for _ in range(6):
        comp = fb_client.post("/api/rounds/r1/compare/next", json={"model_a": "A", "model_b": "B"}, headers=ann)
        comp = comp.json()
        assert "A" not in comp and "model" not in str(comp.keys())  # blind: no model names shown
        winner = "left" if comp["left"].startswith("A") else "right"
        assert fb_client.post(f"/api/comparisons/{comp['comparison_id']}", json={"winner": winner},
                              headers=ann).status_code == 200
    assert fb_client.post("/api/rounds/r1/compare/next", json={"model_a": "A", "model_b": "B"},
                          headers=ann).status_code == 204
    (rate,) = fb_client.get("/api/rounds/r1/winrates", headers=ann).json()
    assert rate["n"] == 6 and rate["win_rate"] == 1.0
    # Wilson 95% interval for 6 wins out of 6.
    assert rate["ci_low"] == pytest.approx(0.6097, abs=1e-3) and rate["ci_high"] == pytest.approx(1.0)


def test_untrusted_text_is_escaped_in_pages(fb_client):
    admin = api_login(fb_client, "admin")
    payload = '<script>alert(1)</script><img src=x onerror="alert(2)">'
    make_round(fb_client, admin, name="r<b>1", items=[{"prompt": payload, "responses": [payload, "fine"]}])
    browser_login(fb_client, "admin")
    for path in ("/rounds/r%3Cb%3E1/label", "/admin", "/admin/rounds/r%3Cb%3E1", "/"):
        html = fb_client.get(path).text
        assert "<script>alert" not in html and "<img src=x" not in html and "<b>1" not in html, path
    html = fb_client.get("/rounds/r%3Cb%3E1/label").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "script-src 'self'" in fb_client.get("/").headers["content-security-policy"]


def test_html_form_label_round_trip(fb_client, fb_sessions):
    admin = api_login(fb_client, "admin")
    make_round(fb_client, admin, overlap=1, items=[{"prompt": "q", "responses": ["x", "y"]}])
    csrf = browser_login(fb_client, "ann2")
    page = fb_client.get("/rounds/r1/label").text
    task_id = re.search(r'name="task_id" value="(\d+)"', page).group(1)
    cids = [int(c) for c in re.findall(r'name="rank_(\d+)"', page)]
    form = {"csrf_token": csrf, "task_id": task_id, f"rank_{cids[0]}": "2", f"rank_{cids[1]}": "1",
            f"rate_{cids[1]}_relevance": "7", f"flag_{cids[0]}": "off_topic", "action": "submit"}
    r = fb_client.post("/rounds/r1/label", data=form)
    assert r.status_code == 200 and "Nothing left to label" in r.text
    with fb_sessions() as db:
        (stored,) = db.scalars(select(Label)).all()
        assert stored.ranking == [cids[1], cids[0]] and stored.ratings[0].value == 7.0
        assert stored.flags[0].kind == "off_topic"


def test_admin_review_and_compare_pages_work_through_forms(fb_client, fb_sessions):
    csrf = browser_login(fb_client, "admin")
    r = fb_client.post("/admin/rounds", data={"csrf_token": csrf, "name": "web", "overlap": "2",
                                              "criteria": "helpful:1-5:Does it help?\nsafe:0-1:Is it harmless?"})
    assert r.status_code == 200 and "Round web" in r.text
    lines = [{"prompt": "q1", "responses": [{"text": "a1", "model": "A"}, {"text": "b1", "model": "B"}]},
             {"prompt": "q2", "responses": ["x", "y"], "gold_ranking": [1, 0]}]
    upload = "".join(json.dumps(x) + "\n" for x in lines).encode()
    r = fb_client.post("/admin/rounds/web/upload", data={"csrf_token": csrf, "kind": "candidate"},
                       files={"file": ("items.jsonl", upload, "application/jsonl")})
    assert r.status_code == 200 and "2 items" in r.text
    policy = json.dumps({"prompt": "q3", "responses": [{"text": "ppo says hi", "model": "ppo"}]}).encode()
    fb_client.post("/admin/rounds/web/upload", data={"csrf_token": csrf, "kind": "policy"},
                   files={"file": ("p.jsonl", policy, "application/jsonl")})
    bad = fb_client.post("/admin/rounds/web/upload", data={"csrf_token": csrf, "kind": "candidate"},
                         files={"file": ("bad.jsonl", b"{not json\n", "application/jsonl")})
    assert bad.status_code == 422 and "line 1" in bad.json()["detail"]
    r = fb_client.post("/admin/invites", data={"csrf_token": csrf, "username": "carol", "role": "reviewer"})
    assert r.status_code == 200 and "/invite/" in r.text
    with fb_sessions() as db:
        rnd = tasks.get_round(db, "web")
        assert [c["name"] for c in rnd.criteria] == ["helpful", "safe"] and rnd.overlap == 2

    reviewer = fb_client.__class__(fb_client.app)
    rcsrf = browser_login(reviewer, "rev")
    page = reviewer.get("/rounds/web/review").text
    sample_id = re.search(r'name="sample_id" value="(\d+)"', page).group(1)
    assert "ppo says hi" in page
    r = reviewer.post("/rounds/web/review", data={"csrf_token": rcsrf, "sample_id": sample_id, "decision": "flag"})
    assert r.status_code == 400 and "say why" in r.text
    r = reviewer.post("/rounds/web/review", data={"csrf_token": rcsrf, "sample_id": sample_id,
                                                  "decision": "flag", "reason": "too short"})
    assert r.status_code == 200 and "No samples waiting" in r.text

    page = reviewer.get("/rounds/web/compare?model_a=A&model_b=B").text
    comparison_id = re.search(r'name="comparison_id" value="(\d+)"', page).group(1)
    left = re.findall(r'<div class="card response">([^<]*)</div>', page)[0]
    r = reviewer.post("/rounds/web/compare", data={"csrf_token": rcsrf, "comparison_id": comparison_id,
                                                   "winner": "left"})
    assert r.status_code == 200 and "No more pairs" in r.text
    (rate,) = tasks_winrates(fb_sessions, "web")
    assert rate["win_rate"] == (1.0 if left == "a1" else 0.0) and rate["n"] == 1
    assert "<svg" in fb_client.get("/admin/rounds/web").text


def tasks_winrates(Sessions, name):
    with Sessions() as db:
        return tasks.win_rates(db, tasks.get_round(db, name))


# ---------------------------------------------------------------- the shape of the app


def role_checks(route) -> set[str]:
    """The roles that ``require(role)`` dependencies anywhere in the route's dependency tree ask for."""
    found, stack = set(), [route.dependant]
    while stack:
        dependant = stack.pop()
        found |= {role for role in ROLES if dependant.call is require(role)}
        stack.extend(dependant.dependencies)
    return found


def test_every_route_but_the_public_ones_has_exactly_one_role_check(fb_app):
    routes = [(m, r) for r in app_routes(fb_app) for m in r.methods if m != "HEAD"]
    assert len(routes) == 40
    for method, route in routes:
        expected = set() if (method, route.path) in PUBLIC else {"admin"} if "admin" in route.tags else None
        checks = role_checks(route)
        assert checks == expected if expected is not None else len(checks) == 1, (method, route.path, checks)


def test_annotators_and_reviewers_get_403_on_every_admin_route(fb_app, fb_client):
    admin_routes = [(m, r.path) for r in app_routes(fb_app) if "admin" in r.tags for m in r.methods]
    assert len(admin_routes) == 13  # 7 JSON, 6 HTML
    for who in ("ann1", "rev"):
        headers = api_login(fb_client, who)  # a bearer token works on the HTML routes too
        for method, path in admin_routes:
            r = fb_client.request(method, re.sub(r"\{[a-z_]+\}", "1", path), headers=headers,
                                  follow_redirects=False)
            assert r.status_code == 403 and r.json()["detail"] == "needs the admin role", (who, method, path)


def test_every_json_route_declares_its_response_model_in_the_openapi_schema(fb_app):
    api = {(m, r.path): r for r in app_routes(fb_app) if r.path.startswith("/api/") or r.path == "/health"
           for m in r.methods}
    schema = fb_app.openapi()
    described = {(m.upper(), path) for path, ops in schema["paths"].items() for m in ops}
    assert described == set(api)  # the JSON API and /health, all of it, and no HTML page
    for (method, path), route in api.items():
        ok = next(v for k, v in schema["paths"][path][method.lower()]["responses"].items() if k.startswith("2"))
        if path.endswith("/export"):  # the one non-JSON answer: JSON lines
            assert set(ok["content"]) == {"application/x-ndjson"}
            continue
        assert route.response_model is not None, (method, path)
        assert "$ref" in json.dumps(ok["content"]["application/json"]["schema"]), (method, path)
    task = schema["components"]["schemas"]["TaskView"]["properties"]
    assert set(task) == {"task_id", "round", "status", "lease_expires_at", "prompt", "candidates", "criteria",
                         "guidelines", "flag_kinds"}


def test_export_formats_in_the_schema_are_the_exporters(fb_client):
    assert typing.get_args(ExportFormat) == FORMATS


def test_login_redirects_only_to_local_paths(fb_client):
    for next_url, expected in (("/rounds/r1/label", "/rounds/r1/label"), ("//evil.example/", "/"),
                               ("/\\evil.example/", "/"), ("https://evil.example/", "/")):
        client = fb_client.__class__(fb_client.app)
        token = re.search(r'name="login_csrf" value="([^"]+)"', client.get("/login").text).group(1)
        r = client.post("/login", data={"username": "ann1", "password": PASSWORD, "login_csrf": token,
                                        "next": next_url}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == expected, next_url


def test_cookies_are_httponly_samesite_and_secure_when_asked(fb_db_url, fb_sessions, fb_users):
    with fb_client_for(create_app(fb_db_url, sessions=fb_sessions, secure_cookies=True)) as client:
        page = client.get("/login")
        assert all(p in page.headers["set-cookie"].lower() for p in ("httponly", "samesite=strict", "secure"))
        token = re.search(r'name="login_csrf" value="([^"]+)"', page.text).group(1)
        r = client.post("/login", data={"username": "ann1", "password": PASSWORD, "login_csrf": token},
                        follow_redirects=False)
        session = next(c for c in r.headers.get_list("set-cookie") if c.startswith("alignloop_session="))
        assert all(p in session.lower() for p in ("httponly", "samesite=lax", "secure"))


def fb_client_for(app):
    from fastapi.testclient import TestClient

    return TestClient(app, base_url="https://testserver")


def test_odd_csrf_tokens_and_oversized_bodies_get_clean_answers(fb_client):
    admin = api_login(fb_client, "admin")
    make_round(fb_client, admin)
    browser_login(fb_client, "ann1")
    odd = fb_client.post("/api/rounds/r1/next", headers={"X-CSRF-Token": "\u00e9t\u00e9".encode("latin-1")})
    assert odd.status_code == 403
    big = fb_client.post("/api/rounds", content=b"x" * (9 * 1024 * 1024),
                         headers={**admin, "content-type": "application/json"})
    assert big.status_code == 413
    for r in (odd, big):
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert r.headers["cache-control"] == "no-store" and r.headers["x-frame-options"] == "DENY"
