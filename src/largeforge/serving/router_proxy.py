"""Passing a request on to an expert: the routing decision, retries over replicas and the
fallback expert, and streams relayed chunk by chunk.

Each request to `/v1/completions` or `/v1/chat/completions` goes to one expert: the one its
`model` names, or for `model: auto` the one the router picks by keywords or by the classifier
(any other model name is a 404 `model_not_found`, as OpenAI answers). The body is passed on
unchanged except for `model`, set to the name the expert's server serves; the answer comes back
unchanged, streams chunk by chunk, with `X-LargeForge-Expert: NAME` (the expert that answered),
`X-LargeForge-Route` (keywords, classifier, default or explicit) and, when another expert
answered, `X-LargeForge-Fallback-From`.

A connection error, a timeout or a 5xx from a replica before any byte has gone to the client is
retried on the expert's next replica, then on the fallback expert's; only when every replica of
both failed (each tried once, whatever its state) does the client get a 503. A 4xx from an
expert (a bad request) is the client's answer and is passed on as it is.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from largeforge.serving.errors import (
    SERVER_ERROR,
    APIError,
    bad_request,
    error_body,
    model_not_found,
)
from largeforge.serving.http import read_json_object
from largeforge.serving.router_health import describe_error, probe
from largeforge.serving.router_pools import ExpertPool, Replica
from largeforge.serving.router_state import RouterState
from largeforge.serving.routing import RouteDecision, routing_text

log = logging.getLogger("largeforge.serving.router")

EXPERT_HEADER = "X-LargeForge-Expert"
ROUTE_HEADER = "X-LargeForge-Route"
FALLBACK_HEADER = "X-LargeForge-Fallback-From"
REPLICA_HEADER = "X-LargeForge-Replica"
AUTO_MODEL = "auto"


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
    """Route the request, try replicas until one answers, and relay its answer."""
    body = await read_json_object(request)
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
    answer = _exhausted(attempt)
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


def _exhausted(attempt: _Attempt) -> Response:
    """The answer when no replica could: the experts' own last 5xx, else a 503 of ours."""
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


async def _forward(state: RouterState, pool: ExpertPool, replica: Replica, path: str,
                   body: Mapping[str, Any], stream: bool) -> httpx.Response | _OpenStream:
    """Send the request to one replica: its full response, or an open stream whose first
    chunk has arrived. Raises `_Retry` for what another replica may answer."""
    client = state.client
    assert client is not None, "the router app has not started"
    start = time.perf_counter()
    try:
        if replica.model_id is None:  # not checked yet: learn the name it serves first
            await probe(state, replica, pool)
        payload = json.dumps({**body, "model": replica.model_id or pool.name}).encode()
        upstream = client.build_request("POST", replica.url + path, content=payload,
                                        headers=pool.upstream_headers())
        response = await client.send(upstream, stream=stream)
    except httpx.TimeoutException as exc:
        raise _Retry("timeout", describe_error(exc)) from exc
    except httpx.ConnectError as exc:
        raise _Retry("connect", describe_error(exc)) from exc
    except httpx.TransportError as exc:
        raise _Retry("protocol", describe_error(exc)) from exc
    except httpx.HTTPStatusError as exc:  # its /health said no
        raise _Retry("health", describe_error(exc)) from exc
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
                raise _Retry("protocol", describe_error(exc)) from exc
            finally:
                await response.aclose()
        replica.breaker.success()
        state.metrics.latency.labels(pool.name).observe(time.perf_counter() - start)
        return response
    return await _open_stream(state, pool, replica, response, start)


async def _open_stream(state: RouterState, pool: ExpertPool, replica: Replica,
                       response: httpx.Response, start: float) -> _OpenStream:
    """Wait for a stream's first chunk: until it comes, a broken stream may still be retried."""
    chunks = response.aiter_raw()
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = b""
    except httpx.TransportError as exc:
        await response.aclose()
        raise _Retry("protocol", describe_error(exc)) from exc
    state.metrics.latency.labels(pool.name).observe(time.perf_counter() - start)
    return _OpenStream(state, pool, replica, response, first, chunks)


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
            _failed(self.state, self.pool, self.replica,
                    _Retry("protocol", describe_error(exc)))
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
