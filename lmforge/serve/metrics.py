"""Prometheus metrics of one server (its own registry, so that several apps in one process never collide):
requests by endpoint and status, tokens in and out, time to first token, time between tokens, and the number of
active and waiting requests."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, active: Callable[[], int], waiting: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.requests = Counter("lmforge_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens of admitted requests",
                                     registry=self.registry)
        self.completion_tokens = Counter("lmforge_completion_tokens", "Tokens generated", registry=self.registry)
        self.time_to_first_token = Histogram("lmforge_time_to_first_token_seconds",
                                             "From the request's arrival to its first generated token",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram("lmforge_inter_token_latency_seconds",
                                             "Between consecutive generated tokens of one request",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        Gauge("lmforge_active_requests", "Requests holding a batch slot", registry=self.registry).set_function(active)
        Gauge("lmforge_queued_requests", "Requests waiting for a batch slot",
              registry=self.registry).set_function(waiting)

    def text(self) -> bytes:
        return generate_latest(self.registry)
