"""The remote reward source: POST <url>/v1/score with {"pairs": [...]} -> {"scores": [...]}."""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from pydantic import ValidationError

from alignloop.cli import main
from alignloop.config import RewardSettings
from alignloop.errors import UserError
from alignloop.rl.rewards import RemoteReward, build_reward


class Scorer(BaseHTTPRequestHandler):
    authorizations: list[str | None] = []  # the Authorization header of every request, in order

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.authorizations.append(self.headers.get("Authorization"))
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
    reward = build_reward(RewardSettings(remote_url=server, weights={"remote": 2.0}, batch_size=4))
    total, means = reward(["ab", "a"], ["abcd", "a"])
    assert total.tolist() == [4.0, 0.0] and means == {"remote": 1.0}


def test_remote_reward_errors_are_one_line(server):
    with pytest.raises(UserError, match="expected 2 scores"):
        RemoteReward(server)(["short", "x"], ["a", "b"])
    with pytest.raises(UserError, match="HTTP 404"):
        RemoteReward(server + "/elsewhere/v1/score")(["p"], ["r"])
    with pytest.raises(UserError, match=r"ConnectError.*\(after 2 tries\)"):
        RemoteReward("http://127.0.0.1:9", timeout=2, retries=1, sleep=lambda _s: None)(["p"], ["r"])


class MockScorer:
    """An httpx mock transport playing a scorer: ``answers`` are replayed in turn (an exception is raised as
    a connection failure, a (status, body) pair is answered); every request is kept."""

    def __init__(self, *answers):
        self.answers, self.requests = list(answers), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        status, body = answer
        return httpx.Response(status, json=body) if not isinstance(body, str) else httpx.Response(status, text=body)

    def reward(self, **kwargs) -> RemoteReward:
        waits = kwargs.pop("waits", [])
        return RemoteReward("https://scorer.example", transport=httpx.MockTransport(self), sleep=waits.append,
                            **kwargs)


def test_remote_reward_sends_the_api_key_from_the_named_environment_variable(server, monkeypatch):
    monkeypatch.setenv("SCORER_KEY", "s3cret")
    settings = RewardSettings(remote_url=server, remote_api_key_env="SCORER_KEY")
    Scorer.authorizations.clear()
    total, _ = build_reward(settings)(["ab", "a"], ["abcd", "a"])
    assert total.tolist() == [2.0, 0.0] and Scorer.authorizations == ["Bearer s3cret"]
    build_reward(RewardSettings(remote_url=server))(["ab"], ["abc"])
    assert Scorer.authorizations[-1] is None  # no key configured, none sent
    monkeypatch.delenv("SCORER_KEY")
    with pytest.raises(UserError, match="environment variable SCORER_KEY is not set"):
        build_reward(settings)


def test_the_key_cannot_be_written_in_the_config():
    with pytest.raises(ValidationError, match="remote_api_key\n.*Extra inputs are not permitted"):
        RewardSettings(remote_url="https://x", remote_api_key="s3cret")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """The scorer over HTTPS on loopback with a self-signed certificate; yields (url, certificate file)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Scorer)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}", str(cert)
    httpd.shutdown()


def test_the_scorers_tls_certificate_is_verified(tls_server, tmp_path):
    url, cert = tls_server
    with pytest.raises(UserError, match="CERTIFICATE_VERIFY_FAILED"):
        RemoteReward(url, retries=0)(["ab"], ["abcd"])
    assert RemoteReward(url, ca_bundle=cert)(["ab"], ["abcd"]) == [2.0]
    with pytest.raises(UserError, match="remote_ca_bundle: .* is not a file"):
        RemoteReward(url, ca_bundle=str(tmp_path / "missing.pem"))


def test_remote_reward_retries_connection_errors_and_5xx_with_backoff():
    waits: list[float] = []
    scorer = MockScorer(httpx.ConnectError("refused"), (503, "busy"), httpx.ReadTimeout("slow"), (200, {"scores": [3]}))
    assert scorer.reward(waits=waits, retries=3, api_key="k")(["p"], ["r"]) == [3.0]
    assert waits == [0.5, 1.0, 2.0] and len(scorer.requests) == 4
    assert {r.headers["Authorization"] for r in scorer.requests} == {"Bearer k"}
    assert str(scorer.requests[0].url) == "https://scorer.example/v1/score"
    with pytest.raises(UserError, match=r"HTTP 502: bad gateway"):
        MockScorer((502, "bad gateway"), (502, "bad gateway")).reward(retries=1)(["p"], ["r"])
    refused = MockScorer((401, {"error": "no"}))
    with pytest.raises(UserError, match="refused the API key"):
        refused.reward(api_key="wrong")(["p"], ["r"])
    assert len(refused.requests) == 1  # a 4xx is not retried


@pytest.mark.parametrize(("body", "needle"), [
    ({"scores": [1.0]}, "expected 2 scores, got [1.0]"),
    ({"scores": [1.0, 2.0, 3.0]}, "expected 2 scores"),
    ({"scores": [1.0, "NaN"]}, "score 1 is 'NaN', not a finite number"),
    ('{"scores": [Infinity, 0]}', "score 0 is inf, not a finite number"),  # Python's json reads these
    ('{"scores": [0, NaN]}', "score 1 is nan, not a finite number"),
    ({"scores": [True, 0]}, "score 0 is True, not a finite number"),
    ({"values": [1, 2]}, "the answer is not"),
    ("<html>oops</html>", "the answer is not"),
])
def test_a_malformed_answer_stops_the_step_with_one_line(body, needle):
    with pytest.raises(UserError, match=re.escape(needle)) as info:
        MockScorer((200, body)).reward()(["p1", "p2"], ["r1", "r2"])
    assert "\n" not in str(info.value)


def test_serve_help_documents_the_api_key_for_a_reward_server(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--api-key API_KEY require 'Authorization: Bearer KEY' on every request, /v1/score included" in text
    assert "reward.remote_api_key_env" in text
