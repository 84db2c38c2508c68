"""Prometheus metrics of one server: a registry per app, so several servers can live in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("alignloop_http_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.request_seconds = Histogram("alignloop_http_request_seconds", "Time to the last byte of a response",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("alignloop_batch_size", "Sequences decoded together in one engine step",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("alignloop_queue_depth", "Requests waiting to join the running batch", registry=r)
        self.queue_depth_seen = Histogram("alignloop_queue_depth_per_step",
                                          "Requests waiting, sampled at every engine step",
                                          buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 1024), registry=r)
        self.running = Gauge("alignloop_running_requests", "Requests in the running batch", registry=r)
        self.prompt_tokens = Counter("alignloop_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("alignloop_generated_tokens", "Tokens generated", registry=r)
        self.time_to_first_token = Histogram("alignloop_time_to_first_token_seconds",
                                             "From arrival to the first generated token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.finished = Counter("alignloop_finished_requests", "Generations by how they ended",
                                ["reason"], registry=r)
        self.rejected = Counter("alignloop_rejected_requests", "Requests refused before generation",
                                ["reason"], registry=r)
        self.scored_pairs = Counter("alignloop_scored_pairs", "(prompt, response) pairs scored", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
