"""The labelling app served in this process: uvicorn on a free loopback port in a background thread, for
simulated people who reach it over HTTP as people reach ``alignloop label``.

    with FeedbackServer(db_url) as server:
        AnnotatorClient(server.url, password, annotator).run("round-1", max_labels=10)
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from alignloop.feedback.web.app import create_app

START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FeedbackServer:
    """The feedback app on 127.0.0.1 while the ``with`` block runs."""

    def __init__(self, db_url: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(db_url), host="127.0.0.1", port=self.port, log_level="warning",
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FeedbackServer:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the feedback app did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
