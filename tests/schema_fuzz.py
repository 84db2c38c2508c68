"""Fuzzing an ASGI app from its own OpenAPI schema with schemathesis (the labelling app's JSON API in
test_feedback_fuzz, ``alignloop serve`` in test_serve_fuzz): for every operation, requests that fit the
schema and requests that break it, sent in-process with the caller's headers. Every answer is checked for
a server error or a traceback in its body, and by schemathesis's own checks (status code, content type,
headers and body as documented, requests that break the schema refused, auth not ignored)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

# A frame line of a Python traceback. (Not the word "Traceback": the fuzzer sends such words itself, and an
# answer may echo them, e.g. "no round named ...".)
TRACEBACK_FRAME = re.compile(r'File "[^"]+", line [0-9]+, in ')


class CountingApp:
    """The ASGI app, counting the HTTP requests it receives (schemathesis's checks send some of their own)."""

    def __init__(self, app) -> None:
        self.app, self.requests = app, 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            self.requests += 1
        await self.app(scope, receive, send)


@dataclass
class FuzzReport:
    cases: Counter[str] = field(default_factory=Counter)  # generated cases per operation label
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)  # answers per (operation label, status)
    failures: list[str] = field(default_factory=list)  # server errors and tracebacks, one line each
    requests: int = 0  # HTTP requests the app received, schemathesis's own included


def fuzz_app(app, openapi: dict[str, Any], config: SchemathesisConfig, headers: dict[str, str],
             examples_per_mode: int, skipped: Collection[tuple[str, str]] = ()) -> FuzzReport:
    """Every operation of ``openapi`` (but the ``(METHOD, path)`` pairs in ``skipped``), ``examples_per_mode``
    cases each of positive and negative data, derandomised so a run repeats itself. A check that fails
    raises (schemathesis names the case and how to reproduce it)."""
    schema = schemathesis.openapi.from_dict(openapi, config=config)
    counting = CountingApp(app)
    schema.app = counting
    report = FuzzReport()
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) in skipped:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            @hypothesis.settings(max_examples=examples_per_mode, deadline=None, database=None, derandomize=True,
                                 phases=[Phase.explicit, Phase.generate],
                                 suppress_health_check=list(HealthCheck))
            def fuzz(case) -> None:
                response = case.call(headers=headers)
                report.cases[case.operation.label] += 1
                report.statuses[case.operation.label, response.status_code] += 1
                if response.status_code >= 500 or TRACEBACK_FRAME.search(response.text):
                    report.failures.append(f"{case.method} {case.formatted_path} {case.body!r:.300} -> "
                                           f"{response.status_code}: {response.text[:300]}")
                case.validate_response(response, headers=headers)

            try:
                fuzz()
            except hypothesis.errors.Unsatisfiable:
                # Nothing to break in an operation without parameters or body (/health, /api/me).
                assert mode is GenerationMode.NEGATIVE and not operation.body and not any(operation.iter_parameters())
    report.requests = counting.requests
    return report
