"""Prometheus metrics of a server, in a registry of its own (so two apps in one process, as in
tests, never share or clash), exposed by `GET /metrics`.

- `largeforge_requests_total{endpoint, status}`: finished HTTP requests.
- `largeforge_request_latency_seconds{endpoint}`: request start to the last byte sent (for a
  stream, the end of the stream).
- `largeforge_time_to_first_token_seconds{endpoint}`: request start to the first generated token.
- `largeforge_prompt_tokens_total`, `largeforge_completion_tokens_total`: tokens in and out.
- `largeforge_generations_total{finish_reason}`: finished choices (stop, length, cancelled,
  error).
- `largeforge_queue_depth`, `largeforge_running_requests` (the running batch size),
  `largeforge_max_batch_size`: read from the engine when scraped.

`RequestMetricsMiddleware` (pure ASGI, so streamed bodies are timed to their end) counts and
times every request; endpoints outside the known routes are counted as `other`, so a scan of
random URLs cannot blow up the number of series.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Seconds; a CPU server's first token may take seconds under load, a GPU's milliseconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    """The metrics of one server. `engine_stats` returns an object with `queue_depth`,
    `running` and `max_batch_size` (the engine's `EngineStats`), read at every scrape."""

    def __init__(
        self,
        engine_stats: Callable[[], Any] | None = None,
        endpoints: Iterable[str] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.endpoints = set(endpoints)
        self.requests = Counter(
            "largeforge_requests", "Finished HTTP requests.", ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "largeforge_request_latency_seconds", "Request start to the last byte sent.",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.ttft = Histogram(
            "largeforge_time_to_first_token_seconds", "Request start to the first token.",
            ["endpoint"], buckets=TTFT_BUCKETS, registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "largeforge_prompt_tokens", "Prompt tokens of finished generations.",
            registry=self.registry,
        )
        self.completion_tokens = Counter(
            "largeforge_completion_tokens", "Generated tokens.", registry=self.registry,
        )
        self.generations = Counter(
            "largeforge_generations", "Finished generations (one per choice) by finish reason.",
            ["finish_reason"], registry=self.registry,
        )
        if engine_stats is not None:
            for name, doc, attribute in (
                ("largeforge_queue_depth", "Requests waiting for a batch slot.", "queue_depth"),
                ("largeforge_running_requests", "Requests in the running batch.", "running"),
                ("largeforge_max_batch_size", "Batch slots of the engine.", "max_batch_size"),
            ):
                gauge = Gauge(name, doc, registry=self.registry)
                gauge.set_function(lambda a=attribute: float(getattr(engine_stats(), a)))

    def endpoint(self, path: str) -> str:
        return path if path in self.endpoints else "other"

    def observe_generation(
        self, finish_reason: str, prompt_tokens: int, completion_tokens: int
    ) -> None:
        """A generation (one choice) finished: "stop", "length", "cancelled" or "error"."""
        self.generations.labels(finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)

    def observe_first_token(self, path: str, seconds: float) -> None:
        self.ttft.labels(self.endpoint(path)).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestMetricsMiddleware:
    """Counts and times every HTTP request into `metrics` (ASGI middleware)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        scope.setdefault("state", {})["start_time"] = start
        status = {"code": 500}
        done = {"flag": False}

        def finish() -> None:
            if done["flag"]:
                return
            done["flag"] = True
            endpoint = self.metrics.endpoint(scope.get("path", ""))
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

        async def timed_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finish()

        try:
            await self.app(scope, receive, timed_send)
        finally:
            finish()  # a stream the client left is counted when it ends
