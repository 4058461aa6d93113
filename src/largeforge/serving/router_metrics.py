"""The router's prometheus metrics, in a registry of its own (a test process may build several
routers; the default registry would refuse the second's metric names).

Counters and the latency histogram are updated by the proxy as requests pass; the replica gauges
(circuit state, health, outstanding requests) are read from the pools when scraped, so they can
never drift from what the router acts on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as prometheus_text
from prometheus_client.core import GaugeMetricFamily

from largeforge.serving.router_pools import CLOSED, HALF_OPEN, OPEN, ExpertPool

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class RouterMetrics:
    """The router's prometheus metrics.

    - `largeforge_router_requests_total{expert, endpoint, status}`: answered requests, by the
      expert that answered (`none` when none could).
    - `largeforge_router_routed_total{expert, method}`: routing decisions.
    - `largeforge_router_fallbacks_total{from_expert, to_expert}`: requests another expert
      answered because the chosen one could not.
    - `largeforge_router_retries_total{expert}`: attempts after the first.
    - `largeforge_router_upstream_failures_total{expert, replica, reason}`: connect, timeout,
      protocol (the connection broke), http_5xx or health (a replica never checked failed its
      first check).
    - `largeforge_router_upstream_latency_seconds{expert}`: request sent to the expert's answer
      (whole body; for a stream, its first chunk).
    - `largeforge_router_circuit_state{expert, replica}` (0 closed, 1 half-open, 2 open),
      `largeforge_router_replica_healthy{expert, replica}` (1, 0; -1 not checked yet),
      `largeforge_router_outstanding_requests{expert, replica}`: read when scraped.
    """

    def __init__(self, pools: Mapping[str, ExpertPool]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("largeforge_router_requests", "Answered requests.",
                                ["expert", "endpoint", "status"], registry=self.registry)
        self.routed = Counter("largeforge_router_routed", "Routing decisions.",
                              ["expert", "method"], registry=self.registry)
        self.fallbacks = Counter("largeforge_router_fallbacks",
                                 "Requests answered by another expert than the one chosen.",
                                 ["from_expert", "to_expert"], registry=self.registry)
        self.retries = Counter("largeforge_router_retries", "Upstream attempts after the first.",
                               ["expert"], registry=self.registry)
        self.failures = Counter("largeforge_router_upstream_failures",
                                "Failed upstream attempts.", ["expert", "replica", "reason"],
                                registry=self.registry)
        self.latency = Histogram("largeforge_router_upstream_latency_seconds",
                                 "Request sent to the expert's answer (a stream: first chunk).",
                                 ["expert"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_ReplicaCollector(pools))

    def render(self) -> tuple[bytes, str]:
        return prometheus_text(self.registry), CONTENT_TYPE_LATEST


class _ReplicaCollector:
    """The per-replica gauges, computed from the pools at scrape time."""

    def __init__(self, pools: Mapping[str, ExpertPool]) -> None:
        self.pools = pools

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["expert", "replica"]
        circuit = GaugeMetricFamily("largeforge_router_circuit_state",
                                    "Circuit breaker: 0 closed, 1 half-open, 2 open.",
                                    labels=labels)
        healthy = GaugeMetricFamily("largeforge_router_replica_healthy",
                                    "Last health check: 1 ok, 0 failed, -1 not checked yet.",
                                    labels=labels)
        outstanding = GaugeMetricFamily("largeforge_router_outstanding_requests",
                                        "Requests in flight to the replica.", labels=labels)
        for pool in self.pools.values():
            for r in pool.replicas:
                circuit.add_metric([pool.name, r.url], _STATE_VALUE[r.breaker.state])
                healthy.add_metric([pool.name, r.url], -1 if r.healthy is None else
                                   int(r.healthy))
                outstanding.add_metric([pool.name, r.url], r.outstanding)
        yield from (circuit, healthy, outstanding)
