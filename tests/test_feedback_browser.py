"""A real browser (Playwright driving Debian's chromium) against the real server: log in, rank with the
keyboard and by dragging, rate, flag, submit, and find the label in the export. Candidates carry
<script> and <img onerror> payloads; none of them may run. Screenshots go to test-artifacts/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from alignloop.feedback import tasks
from alignloop.feedback.db import open_db
from feedback_fixtures import *  # noqa: F403  (fixtures)
from feedback_fixtures import PASSWORD, create_users

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAYLOADS = ['<script>window.__pwned = "script"</script>',
            '<img src=x onerror="window.__pwned = \'img\'">',
            '"><svg onload="window.__pwned = \'svg\'">']


def chromium_binary() -> str | None:
    for path in ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if Path(path).exists():
            return path
    return shutil.which("chromium")


@pytest.fixture
def browser_page():
    """A page in Debian's chromium (no `playwright install`). Playwright is started and stopped inside this
    fixture, not session-wide as pytest-playwright's fixtures do: its event loop must not outlive the test,
    or later tests that call asyncio.run() fail."""
    from playwright.sync_api import sync_playwright

    binary = chromium_binary()
    if binary is None:
        pytest.skip("chromium is not installed; `make test` installs it (apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=binary, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        finally:
            browser.close()


@pytest.mark.slow
def test_rank_rate_submit_in_a_real_browser(browser_page, tmp_path, live_server_factory):
    page = browser_page
    db_url = str(tmp_path / "feedback.db")
    Sessions = open_db(db_url)
    with Sessions() as db:
        rnd = tasks.create_round(db, "xss", [{"name": "relevance", "min": 1, "max": 5, "guideline": "on topic?"}],
                                 guidelines="Prefer <b>safe</b> answers.", overlap=1)
        tasks.add_items(db, rnd, [{"prompt": "Say hi " + PAYLOADS[0], "responses": PAYLOADS}])
    create_users(db_url, {"alice": "annotator", "boss": "admin"})
    server = live_server_factory(db_url).start()
    ARTIFACTS.mkdir(exist_ok=True)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

    page.goto(server.url + "/rounds/xss/label")
    assert "/login" in page.url  # not logged in: sent to the login page
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("#ranking")

    # The payloads are shown as text, and none of them ran.
    items = page.locator("#ranking li.candidate")
    assert items.count() == 3
    shown = [items.nth(i).locator(".response").inner_text() for i in range(3)]
    assert sorted(shown) == sorted(PAYLOADS)
    assert PAYLOADS[0] in page.locator("#prompt").inner_text()
    assert page.locator("#ranking img, #ranking script, #ranking svg, #prompt script").count() == 0
    assert page.evaluate("window.__pwned === undefined") and dialogs == []

    # Keyboard: focus the last card and press 1 to make it best; then drag the new last card to the top.
    order = [items.nth(i).get_attribute("data-id") for i in range(3)]
    items.nth(2).focus()
    page.keyboard.press("1")
    after_key = [items.nth(i).get_attribute("data-id") for i in range(3)]
    assert after_key == [order[2], order[0], order[1]]
    items.nth(2).drag_to(items.nth(0), target_position={"x": 20, "y": 5})
    final = [items.nth(i).get_attribute("data-id") for i in range(3)]
    assert final == [order[1], order[2], order[0]]
    # The rank selects (what the form submits) follow the visual order.
    assert [page.locator(f"select[name=rank_{cid}]").input_value() for cid in final] == ["1", "2", "3"]

    for score, cid in zip(("5", "3", "1"), final, strict=True):
        page.select_option(f"select[name=rate_{cid}_relevance]", score)
    page.check(f"input[name=flag_{final[2]}][value=wrong]")
    page.fill("textarea[name=comment]", "last one is wrong")
    page.screenshot(path=str(ARTIFACTS / "feedback-label.png"), full_page=True)
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("#queue-empty")
    assert "Done 1 of 1" in page.locator("#progress").inner_text()
    assert page.evaluate("window.__pwned === undefined") and dialogs == []

    # The label is in the export, in the order chosen in the browser.
    with httpx.Client(base_url=server.url) as http:
        token = http.post("/api/login", json={"username": "boss", "password": PASSWORD}).json()["token"]
        headers = {"Authorization": f"Bearer {token}"}
        (ranking,) = [json.loads(x) for x in http.get("/api/rounds/xss/export?format=rankings",
                                                      headers=headers).text.splitlines()]
        ratings = [json.loads(x) for x in http.get("/api/rounds/xss/export?format=ratings",
                                                   headers=headers).text.splitlines()]
    text = dict(zip(order, shown, strict=True))
    assert [ranking["responses"][i] for i in ranking["ranking"]] == [text[c] for c in final]
    assert {r["response"]: r["scores"]["relevance"] for r in ratings} == {
        text[final[0]]: 5.0, text[final[1]]: 3.0, text[final[2]]: 1.0}

    # The admin dashboard (charts, tables) renders the same untrusted text without running it.
    page.context.clear_cookies()
    page.goto(server.url + "/login")
    page.fill("input[name=username]", "boss")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.goto(server.url + "/admin/rounds/xss")
    page.wait_for_selector("svg.chart")
    page.screenshot(path=str(ARTIFACTS / "feedback-admin.png"), full_page=True)
    assert page.evaluate("window.__pwned === undefined") and dialogs == []
