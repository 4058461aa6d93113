"""What the router's handlers, proxy and health checks share: the expert pools built from a
`RouterConfig`, the routing decision maker, the metrics and the HTTP client to the experts.

Kept apart from the app so the proxy and the health checks can work on it without importing the
app (which imports them).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import httpx

from largeforge.errors import LargeForgeError
from largeforge.serving.router_config import RouterConfig
from largeforge.serving.router_metrics import RouterMetrics
from largeforge.serving.router_pools import CircuitBreaker, ExpertPool, Replica
from largeforge.serving.routing import ClassifierRouter, KeywordRouter, Router


class RouterState:
    """Everything the router's handlers share."""

    def __init__(self, config: RouterConfig, local_urls: Mapping[str, Sequence[str]]) -> None:
        self.config = config
        self.pools = _pools(config, local_urls)
        self.router = build_router(config)
        self.metrics = RouterMetrics(self.pools)
        self.created = int(time.time())
        self.client: httpx.AsyncClient | None = None  # opened and closed by the app's lifespan

    def pools_to_try(self, chosen: str) -> list[ExpertPool]:
        """The chosen expert's pool, then the fallback's (unless it is the same expert)."""
        pools = [self.pools[chosen]]
        if self.config.fallback != chosen:
            pools.append(self.pools[self.config.fallback])
        return pools


def _pools(config: RouterConfig, local_urls: Mapping[str, Sequence[str]]) -> dict[str, ExpertPool]:
    """A pool per expert: its configured URLs plus those of the servers started for it."""
    pools: dict[str, ExpertPool] = {}
    for spec in config.experts:
        urls = list(spec.record.urls) + list(local_urls.get(spec.name, ()))
        if spec.record.replicas and not local_urls.get(spec.name):
            raise LargeForgeError(
                f"expert {spec.name!r} wants {spec.record.replicas} local replica(s) of "
                f"{spec.record.model}; start them with LocalReplicas (or serve_router)"
            )
        pools[spec.name] = ExpertPool(spec.name, [
            Replica(spec.name, url, CircuitBreaker(config.breaker.failure_threshold,
                                                   config.breaker.cooldown))
            for url in urls
        ], spec.api_key, spec.record.description)
    return pools


def build_router(config: RouterConfig) -> Router:
    """The router `config.routing` asks for: keywords of the experts, or a trained classifier;
    unmatched requests go to `routing.default` (the fallback when unset)."""
    routing = config.routing
    default = routing.default or config.fallback
    if routing.method == "classifier":
        assert routing.classifier is not None
        return ClassifierRouter(routing.classifier, default,
                                min_confidence=routing.min_confidence)
    return KeywordRouter({s.name: s.record.keywords for s in config.experts}, default)
