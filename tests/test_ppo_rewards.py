"""The remote reward source: POST <url>/v1/score with {"pairs": [...]} -> {"scores": [...]}."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alignloop.errors import UserError
from alignloop.rl.rewards import RemoteReward, build_reward


class Scorer(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/score":
            self.send_response(404)
            self.end_headers()
            return
        scores = [len(p["response"]) - len(p["prompt"]) for p in body["pairs"]]
        if any(p["prompt"] == "short" for p in body["pairs"]):
            scores = scores[:-1]  # a broken server: one score missing
        out = json.dumps({"scores": scores}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Scorer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_remote_reward_scores_pairs(server):
    reward = build_reward(None, [], server, {"remote": 2.0}, batch_size=4)
    total, means = reward(["ab", "a"], ["abcd", "a"])
    assert total.tolist() == [4.0, 0.0] and means == {"remote": 1.0}


def test_remote_reward_errors_are_one_line(server):
    with pytest.raises(UserError, match="expected 2 scores"):
        RemoteReward(server)(["short", "x"], ["a", "b"])
    with pytest.raises(UserError, match="HTTPStatusError"):
        RemoteReward(server + "/elsewhere/v1/score")(["p"], ["r"])
    with pytest.raises(UserError, match="ConnectError"):
        RemoteReward("http://127.0.0.1:9", timeout=2)(["p"], ["r"])
