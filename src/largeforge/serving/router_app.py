"""The expert router: one OpenAI-compatible endpoint in front of several expert servers.

    config = load_router_config("router.yaml")
    with LocalReplicas(config) as local:            # starts `serve inference` for model experts
        app = create_router_app(config, local_urls=local.urls)
        uvicorn.run(app, host="127.0.0.1", port=8000)

(`serve_router` does exactly that; `largeforge serve router --config router.yaml` calls it.)

Each request to `/v1/completions` or `/v1/chat/completions` goes to one expert: the one its
`model` names, or for `model: auto` the one the router picks by keywords or by the classifier
(any other model name is a 404 `model_not_found`, as OpenAI answers). The body is
passed on unchanged except for `model`, set to the name the expert's server serves; the answer
comes back unchanged, streams chunk by chunk, with `X-LargeForge-Expert: NAME` (the expert that
answered), `X-LargeForge-Route` (keywords, classifier, default or explicit) and, when another
expert answered, `X-LargeForge-Fallback-From`.

Among an expert's replicas the one with the fewest outstanding requests is chosen (ties in turn).
A replica is skipped while its last health check (`GET /health` every `health.interval`) failed
or its circuit breaker is open: `breaker.failure_threshold` consecutive failed requests open it,
and after `breaker.cooldown` seconds one trial request is let through (half-open), whose outcome
closes or re-opens it. A connection error, a timeout or a 5xx from a replica before any byte has
gone to the client is retried on the expert's next replica, then on the fallback expert's; only
when every replica of both failed (each tried once, whatever its state) does the client get a
503. A 4xx from an expert (a bad request) is the client's answer and is passed on as it is.

The router loads no model: it is a small process of its own (with keyword routing it does not
even import torch; skops, which loads the classifier, imports scikit-learn, which imports it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as prometheus_text
from prometheus_client.core import GaugeMetricFamily

from largeforge.errors import LargeForgeError
from largeforge.serving.auth import API_KEYS_ENV, Authenticator, RateLimiter
from largeforge.serving.errors import (
    SERVER_ERROR,
    APIError,
    bad_request,
    error_body,
    install_error_handlers,
    model_not_found,
)
from largeforge.serving.openai_schema import ModelCard, ModelList
from largeforge.serving.router_config import RouterConfig, load_router_config
from largeforge.serving.routing import (
    ClassifierRouter,
    KeywordRouter,
    RouteDecision,
    Router,
    routing_text,
)

log = logging.getLogger("largeforge.serving.router")

EXPERT_HEADER = "X-LargeForge-Expert"
ROUTE_HEADER = "X-LargeForge-Route"
FALLBACK_HEADER = "X-LargeForge-Fallback-From"
REPLICA_HEADER = "X-LargeForge-Replica"
AUTO_MODEL = "auto"
MAX_BODY_BYTES = 4 * 2**20
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
_STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


# -- circuit breaker and replicas ---------------------------------------------------------------


class CircuitBreaker:
    """Closed: requests pass. `threshold` consecutive failures open it: no request passes for
    `cooldown` seconds; then it is half-open and lets one trial request through, whose success
    closes it and whose failure opens it again."""

    def __init__(self, threshold: int, cooldown: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return CLOSED
        return HALF_OPEN if self.clock() - self.opened_at >= self.cooldown else OPEN

    def available(self) -> bool:
        state = self.state
        return state == CLOSED or (state == HALF_OPEN and not self._trial)

    def acquire(self) -> bool:
        """Take a pass for one request: False when the breaker lets none through now."""
        if not self.available():
            return False
        if self.state == HALF_OPEN:
            self._trial = True
        return True

    def success(self) -> None:
        self.failures, self.opened_at, self._trial = 0, None, False

    def failure(self) -> None:
        self.failures += 1
        self._trial = False
        if self.opened_at is not None or self.failures >= self.threshold:
            self.opened_at = self.clock()

    def release(self) -> None:
        """A request that ended without telling (the client left): the trial slot is free."""
        self._trial = False


@dataclass(eq=False)
class Replica:
    """One server of an expert."""

    expert: str
    url: str
    breaker: CircuitBreaker
    outstanding: int = 0
    healthy: bool | None = None  # None: not checked yet
    model_id: str | None = None  # the model name the server serves
    last_error: str | None = None

    def usable(self) -> bool:
        return self.healthy is not False and self.breaker.available()

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "healthy": self.healthy, "circuit": self.breaker.state,
                "outstanding": self.outstanding, "model": self.model_id,
                "last_error": self.last_error}


@dataclass
class ExpertPool:
    name: str
    replicas: list[Replica]
    api_key: str | None = None
    description: str | None = None
    _turn: int = 0

    def pick(self, exclude: set[int]) -> Replica | None:
        """The usable replica with the fewest outstanding requests (ties taken in turn), not
        in `exclude` (ids of replicas already tried); None when there is none."""
        self._turn += 1
        n = len(self.replicas)
        order = sorted(
            (r for r in self.replicas if id(r) not in exclude and r.usable()),
            key=lambda r: (r.outstanding, (self.replicas.index(r) - self._turn) % n),
        )
        for replica in order:
            if replica.breaker.acquire():
                return replica
        return None

    def available(self) -> bool:
        return any(r.usable() for r in self.replicas)


# -- metrics ------------------------------------------------------------------------------------


class RouterMetrics:
    """The router's prometheus metrics, in a registry of its own.

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


# -- the app ------------------------------------------------------------------------------------


class _Retry(Exception):
    """An attempt failed in a way another replica may not."""

    def __init__(self, reason: str, detail: str, response: httpx.Response | None = None,
                 counts: bool = True) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.response, self.counts = reason, detail, response, counts


@dataclass
class _Attempt:
    """One request's walk over replicas: which were tried and who answered."""

    chosen: str
    fallback: str
    tried: set[int] = field(default_factory=set)
    attempts: int = 0
    last: _Retry | None = None


class RouterState:
    """Everything the router's handlers share."""

    def __init__(self, config: RouterConfig, local_urls: Mapping[str, Sequence[str]]) -> None:
        self.config = config
        self.pools: dict[str, ExpertPool] = {}
        for spec in config.experts:
            urls = list(spec.record.urls) + list(local_urls.get(spec.name, ()))
            if spec.record.replicas and not local_urls.get(spec.name):
                raise LargeForgeError(
                    f"expert {spec.name!r} wants {spec.record.replicas} local replica(s) of "
                    f"{spec.record.model}; start them with LocalReplicas (or serve_router)"
                )
            self.pools[spec.name] = ExpertPool(spec.name, [
                Replica(spec.name, url, CircuitBreaker(config.breaker.failure_threshold,
                                                       config.breaker.cooldown))
                for url in urls
            ], spec.api_key, spec.record.description)
        self.router = build_router(config)
        self.metrics = RouterMetrics(self.pools)
        self.created = int(time.time())
        self.client: httpx.AsyncClient | None = None

    def pools_to_try(self, chosen: str) -> list[ExpertPool]:
        pools = [self.pools[chosen]]
        if self.config.fallback != chosen:
            pools.append(self.pools[self.config.fallback])
        return pools


def build_router(config: RouterConfig) -> Router:
    routing = config.routing
    default = routing.default or config.fallback
    if routing.method == "classifier":
        assert routing.classifier is not None
        return ClassifierRouter(routing.classifier, default,
                                min_confidence=routing.min_confidence)
    return KeywordRouter({s.name: s.record.keywords for s in config.experts}, default)


def create_router_app(
    config: RouterConfig,
    *,
    local_urls: Mapping[str, Sequence[str]] | None = None,
    api_keys: Sequence[str] = (),
    rate_limit: float | None = None,
) -> FastAPI:
    """The router's FastAPI app. `local_urls`: the URLs of the servers started for experts
    with `replicas` (see `LocalReplicas`). `api_keys` / `rate_limit`: as `serve inference`."""
    state = RouterState(config, local_urls or {})
    authenticator = Authenticator(api_keys)
    limiter = RateLimiter(rate_limit) if rate_limit is not None else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        up = config.upstream
        state.client = httpx.AsyncClient(
            timeout=httpx.Timeout(up.timeout, connect=up.connect_timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        await check_all(state)
        checker = asyncio.create_task(_health_loop(state))
        try:
            yield
        finally:
            checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checker
            await state.client.aclose()

    app = FastAPI(title="LargeForge router", summary="OpenAI-compatible expert router",
                  lifespan=lifespan)
    app.state.router = state
    install_error_handlers(app)
    app.add_middleware(_ExpertHeaderMiddleware)

    async def authorize(request: Request) -> None:
        key = authenticator.check(request.headers.get("authorization"))
        if limiter is not None:
            client = request.client.host if request.client else "unknown"
            limiter.check(key if key is not None else f"address:{client}")

    api = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @api.get("/models")
    async def list_models() -> ModelList:
        names = [*state.pools, AUTO_MODEL]
        return ModelList(data=[ModelCard(id=n, created=state.created, owned_by="largeforge")
                               for n in names])

    @api.get("/models/{model}")
    async def get_model(model: str) -> ModelCard:
        if model not in state.pools and model != AUTO_MODEL:
            raise model_not_found(model)
        return ModelCard(id=model, created=state.created, owned_by="largeforge")

    @api.post("/completions", response_model=None)
    async def completions(request: Request) -> Response:
        return await proxy(state, request, "/v1/completions")

    @api.post("/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        return await proxy(state, request, "/v1/chat/completions")

    app.include_router(api)

    @app.get("/health")
    async def health() -> JSONResponse:
        experts = {name: {"available": pool.available(),
                          "replicas": [r.to_json() for r in pool.replicas]}
                   for name, pool in state.pools.items()}
        up = [name for name, e in experts.items() if e["available"]]
        status = "ok" if len(up) == len(experts) else ("degraded" if up else "down")
        return JSONResponse({"status": status, "fallback": config.fallback,
                             "routing": config.routing.method, "experts": experts},
                            status_code=200 if up else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        payload, content_type = state.metrics.render()
        return Response(payload, media_type=content_type)

    return app


class _ExpertHeaderMiddleware:
    """Every /v1 response names the expert that answered (`none` when none did)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == EXPERT_HEADER.lower().encode() for k, _ in headers):
                    headers.append((EXPERT_HEADER.lower().encode(), b"none"))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)


# -- proxying -----------------------------------------------------------------------------------


async def _read_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"The request body is larger than {MAX_BODY_BYTES // 2**20} MiB.",
                       code="request_too_large")
    if not raw.strip():
        raise bad_request("The request needs a JSON body.", None, "invalid_json")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"We could not parse the JSON body of your request ({exc}). The body "
                          "must be a JSON object.", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"The request body must be a JSON object, got {type(body).__name__}.",
                          None, "invalid_type")
    return body


def decide(state: RouterState, body: Mapping[str, Any]) -> RouteDecision:
    """The expert `body` goes to: the one its `model` names, else (`auto`) the router's pick."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("You must provide a model parameter: an expert's name or "
                          f"'{AUTO_MODEL}' to let the router choose.", "model", "invalid_value")
    if model in state.pools:
        return RouteDecision(model, "explicit", 1.0)
    if model != AUTO_MODEL:
        raise model_not_found(model)
    return state.router.route(routing_text(body))


async def proxy(state: RouterState, request: Request, path: str) -> Response:
    body = await _read_body(request)
    decision = decide(state, body)
    state.metrics.routed.labels(decision.expert, decision.method).inc()
    request.state.expert = decision.expert
    stream = bool(body.get("stream"))
    attempt = _Attempt(decision.expert, state.config.fallback)
    for pool, replica in _candidates(state, attempt):
        attempt.attempts += 1
        if attempt.attempts > 1:
            state.metrics.retries.labels(pool.name).inc()
        replica.outstanding += 1
        done = False
        try:
            response = await _forward(state, pool, replica, path, body, stream)
            headers = {EXPERT_HEADER: pool.name, ROUTE_HEADER: decision.method,
                       REPLICA_HEADER: replica.url}
            if pool.name != decision.expert:
                headers[FALLBACK_HEADER] = decision.expert
                state.metrics.fallbacks.labels(decision.expert, pool.name).inc()
            request.state.expert = pool.name
            if isinstance(response, _OpenStream):
                done = True  # the stream releases the replica when it ends
                state.metrics.requests.labels(pool.name, path, "200").inc()
                return response.respond(headers)
            state.metrics.requests.labels(pool.name, path, str(response.status_code)).inc()
            return Response(response.content, status_code=response.status_code,
                            headers=headers, media_type=response.headers.get("content-type"))
        except _Retry as exc:
            _failed(state, pool, replica, exc)
            attempt.last = exc
        except BaseException:  # a bug, or the request cancelled: the trial slot is not held
            replica.breaker.release()
            raise
        finally:
            if not done:
                replica.outstanding -= 1
    answer = _exhausted(state, attempt)
    state.metrics.requests.labels("none", path, str(answer.status_code)).inc()
    return answer


def _candidates(state: RouterState, attempt: _Attempt) -> Iterator[tuple[ExpertPool, Replica]]:
    """Usable replicas of the chosen expert, then of the fallback, by load; then, as a last
    resort, every replica of both not tried yet, whatever its health or breaker says."""
    pools = state.pools_to_try(attempt.chosen)
    for pool in pools:
        while (replica := pool.pick(attempt.tried)) is not None:
            attempt.tried.add(id(replica))
            yield pool, replica
    for pool in pools:
        for replica in sorted(pool.replicas, key=lambda r: r.outstanding):
            if id(replica) not in attempt.tried:
                attempt.tried.add(id(replica))
                yield pool, replica


def _failed(state: RouterState, pool: ExpertPool, replica: Replica, exc: _Retry) -> None:
    replica.last_error = f"{exc.reason}: {exc.detail}"
    state.metrics.failures.labels(pool.name, replica.url, exc.reason).inc()
    if exc.counts:
        replica.breaker.failure()
    else:
        replica.breaker.release()
    log.warning("expert %s replica %s failed (%s: %s); trying the next", pool.name, replica.url,
                exc.reason, exc.detail)


def _exhausted(state: RouterState, attempt: _Attempt) -> Response:
    last = attempt.last
    if last is not None and last.response is not None:  # the experts' own 5xx answer
        return Response(last.response.content, status_code=last.response.status_code,
                        media_type=last.response.headers.get("content-type"),
                        headers=_retry_after(last.response))
    names = " and ".join(dict.fromkeys([attempt.chosen, attempt.fallback]))
    detail = f" (last error: {last.reason}: {last.detail})" if last else ""
    return APIError(503, f"No replica of {names} could answer{detail}.", SERVER_ERROR, None,
                    "expert_unavailable", headers={"Retry-After": "1"}).response()


def _retry_after(response: httpx.Response) -> dict[str, str]:
    value = response.headers.get("retry-after")
    return {"Retry-After": value} if value else {}


def _upstream_headers(pool: ExpertPool) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    if pool.api_key:
        headers["authorization"] = f"Bearer {pool.api_key}"
    return headers


async def _forward(state: RouterState, pool: ExpertPool, replica: Replica, path: str,
                   body: Mapping[str, Any], stream: bool) -> httpx.Response | _OpenStream:
    """Send the request to one replica: its full response, or an open stream whose first
    chunk has arrived. Raises `_Retry` for what another replica may answer."""
    client = state.client
    assert client is not None, "the router app has not started"
    start = time.perf_counter()
    try:
        if replica.model_id is None:  # not checked yet: learn the name it serves first
            await _probe(state, replica, pool)
        payload = json.dumps({**body, "model": replica.model_id or pool.name}).encode()
        upstream = client.build_request("POST", replica.url + path, content=payload,
                                        headers=_upstream_headers(pool))
        response = await client.send(upstream, stream=stream)
    except httpx.TimeoutException as exc:
        raise _Retry("timeout", _describe(exc)) from exc
    except httpx.ConnectError as exc:
        raise _Retry("connect", _describe(exc)) from exc
    except httpx.TransportError as exc:
        raise _Retry("protocol", _describe(exc)) from exc
    except httpx.HTTPStatusError as exc:  # its /health said no
        raise _Retry("health", _describe(exc)) from exc
    if response.status_code >= 500:
        if stream:
            with contextlib.suppress(httpx.HTTPError):
                await response.aread()
            await response.aclose()
        # A full queue (503) is load, not a broken replica: retried, not held against it.
        raise _Retry("http_5xx", f"HTTP {response.status_code}", response,
                     counts=response.status_code != 503)
    if not stream or response.status_code != 200:
        if stream:
            try:
                await response.aread()
            except httpx.TransportError as exc:
                raise _Retry("protocol", _describe(exc)) from exc
            finally:
                await response.aclose()
        replica.breaker.success()
        state.metrics.latency.labels(pool.name).observe(time.perf_counter() - start)
        return response
    chunks = response.aiter_raw()
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = b""
    except httpx.TransportError as exc:
        await response.aclose()
        raise _Retry("protocol", _describe(exc)) from exc
    state.metrics.latency.labels(pool.name).observe(time.perf_counter() - start)
    return _OpenStream(state, pool, replica, response, first, chunks)


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


class _OpenStream:
    """An upstream stream whose first chunk arrived: passed to the client chunk by chunk."""

    def __init__(self, state: RouterState, pool: ExpertPool, replica: Replica,
                 response: httpx.Response, first: bytes, rest: AsyncIterator[bytes]) -> None:
        self.state, self.pool, self.replica = state, pool, replica
        self.response, self.first, self.rest = response, first, rest
        self.outcome: str | None = None  # "ok", "failed"; None: the client left
        self._closed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        if self.first:
            yield self.first
        try:
            async for chunk in self.rest:
                yield chunk
            self.outcome = "ok"
        except httpx.TransportError as exc:
            # Bytes already went to the client: the stream cannot move to another replica.
            self.outcome = "failed"
            _failed(self.state, self.pool, self.replica, _Retry("protocol", _describe(exc)))
            message = f"The expert {self.pool.name} failed in the middle of the stream."
            yield f"data: {json.dumps(error_body(message, SERVER_ERROR))}\n\n".encode()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.replica.outstanding -= 1
        if self.outcome == "ok":
            self.replica.breaker.success()
        elif self.outcome is None:
            self.replica.breaker.release()
        await self.response.aclose()

    def respond(self, headers: dict[str, str]) -> Response:
        return _ClosingStream(self.chunks(), self.close, status_code=self.response.status_code,
                              headers=headers,
                              media_type=self.response.headers.get("content-type"))


class _ClosingStream(StreamingResponse):
    """A StreamingResponse that always runs `on_close` (also when the client went away)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            await self._on_close()


# -- health checks ------------------------------------------------------------------------------


async def _probe(state: RouterState, replica: Replica, pool: ExpertPool) -> None:
    """GET /health: marks the replica healthy or not and learns the model name it serves."""
    client = state.client
    assert client is not None
    response = await client.get(replica.url + "/health", timeout=state.config.health.timeout,
                                headers=_upstream_headers(pool))
    if response.status_code != 200:
        raise httpx.HTTPStatusError(f"health check answered {response.status_code}",
                                    request=response.request, response=response)
    model = _json(response).get("model")
    if not isinstance(model, str):  # a server whose /health does not say: ask /v1/models
        listed = await client.get(replica.url + "/v1/models",
                                  timeout=state.config.health.timeout,
                                  headers=_upstream_headers(pool))
        data = _json(listed).get("data") or [{}]
        model = data[0].get("id") if isinstance(data[0], dict) else None
    replica.model_id = model if isinstance(model, str) else replica.model_id


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        value = response.json()
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def check_replica(state: RouterState, pool: ExpertPool, replica: Replica) -> bool:
    try:
        await _probe(state, replica, pool)
    except (httpx.HTTPError, ValueError) as exc:
        if replica.healthy is not False:
            log.warning("expert %s replica %s failed its health check: %s", pool.name,
                        replica.url, _describe(exc))
        replica.healthy, replica.last_error = False, f"health: {_describe(exc)}"
        return False
    replica.healthy = True
    return True


async def check_all(state: RouterState) -> None:
    await asyncio.gather(*(check_replica(state, pool, r) for pool in state.pools.values()
                           for r in pool.replicas))


async def _health_loop(state: RouterState) -> None:
    while True:
        await asyncio.sleep(state.config.health.interval)
        try:
            await check_all(state)
        except Exception:  # a bug here must not stop the checks for good
            log.exception("health checks failed")


# -- local replicas -----------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the replica gets SIGTERM when the router dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalReplicas:
    """`largeforge serve inference` servers on loopback for the experts that name a model and a
    number of `replicas`; their logs go to `log_dir` (a new temporary directory by default).
    A context manager: the servers are stopped on exit."""

    def __init__(self, config: RouterConfig, log_dir: str | Path | None = None,
                 *, host: str = "127.0.0.1") -> None:
        self.config = config
        self.host = host
        self.log_dir = Path(log_dir) if log_dir else None
        self.urls: dict[str, list[str]] = {}
        self.processes: list[tuple[str, subprocess.Popen, Path]] = []

    def __enter__(self) -> LocalReplicas:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        wanted = [(s.name, s.record.model, i) for s in self.config.experts
                  for i in range(s.record.replicas)]
        if not wanted:
            return
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="largeforge-router-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        pending: list[tuple[str, str, subprocess.Popen, Path]] = []
        # The router's own keys are not the replicas': they listen on loopback, keyless.
        env = {k: v for k, v in os.environ.items() if k != API_KEYS_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        for name, model, index in wanted:
            port = free_port(self.host)
            url = f"http://{self.host}:{port}"
            log_file = self.log_dir / f"{name}-{index}.log"
            command = [sys.executable, "-m", "largeforge.cli.main", "serve", "inference",
                       "--model", str(model), "--host", self.host, "--port", str(port),
                       "--served-model-name", name]
            with open(log_file, "wb") as out:
                proc = subprocess.Popen(
                    command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=env,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )
            self.processes.append((name, proc, log_file))
            pending.append((name, url, proc, log_file))
        deadline = time.monotonic() + self.config.upstream.startup_timeout
        for name, url, proc, log_file in pending:
            _wait_ready(name, url, proc, log_file, deadline)
            self.urls.setdefault(name, []).append(url)

    def stop(self) -> None:
        for _, proc, _ in self.processes:
            if proc.poll() is None:
                proc.terminate()
        for _, proc, _ in self.processes:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()


def _wait_ready(name: str, url: str, proc: subprocess.Popen, log_file: Path,
                deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_file.read_text(encoding="utf-8", errors="replace").strip()
            tail = tail.splitlines()[-1] if tail else "no output"
            raise LargeForgeError(
                f"the server for expert {name!r} exited with code {proc.returncode} before it "
                f"was ready: {tail} (log: {log_file})"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        time.sleep(0.2)
    raise LargeForgeError(f"the server for expert {name!r} was not ready after the startup "
                          f"timeout (upstream.startup_timeout); log: {log_file}")


def serve_router(
    config_path: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_keys: Sequence[str] = (),
    rate_limit: float | None = None,
    log_dir: str | Path | None = None,
    log_level: str = "info",
    on_ready: Callable[[RouterConfig, LocalReplicas], None] | None = None,
) -> None:
    """Load router.yaml, start the local replicas, serve until interrupted (SIGINT) or asked to
    stop (SIGTERM: returns normally), then stop the replicas."""
    import uvicorn

    config = load_router_config(config_path)
    # uvicorn shuts down gracefully on SIGTERM and then raises the signal again for the handler
    # it found: this one turns it into an exception, so the replicas are stopped on the way out.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        with LocalReplicas(config, log_dir) as local:
            app = create_router_app(config, local_urls=local.urls, api_keys=api_keys,
                                    rate_limit=rate_limit)
            if on_ready is not None:
                on_ready(config, local)
            uvicorn.run(app, host=host, port=port, log_level=log_level)
    except _Stop:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Stop(Exception):
    """SIGTERM arrived."""


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop()
