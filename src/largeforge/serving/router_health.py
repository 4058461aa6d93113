"""The router's health checks: `GET /health` of every replica every `health.interval` seconds,
and the router's own `/health` report built from what they found.

A replica whose last check failed is skipped by the proxy until a check passes again. A check
also learns the model name the replica's server serves (from its `/health`, else `/v1/models`),
which the proxy writes into the requests it passes on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

from largeforge.serving.router_pools import ExpertPool, Replica
from largeforge.serving.router_state import RouterState

log = logging.getLogger("largeforge.serving.router")


def describe_error(exc: Exception) -> str:
    """An exception as a log line and `last_error` show it: httpx errors often have no text."""
    return str(exc) or type(exc).__name__


async def probe(state: RouterState, replica: Replica, pool: ExpertPool) -> None:
    """GET /health: marks the replica healthy or not and learns the model name it serves."""
    client = state.client
    assert client is not None
    response = await client.get(replica.url + "/health", timeout=state.config.health.timeout,
                                headers=pool.upstream_headers())
    if response.status_code != 200:
        raise httpx.HTTPStatusError(f"health check answered {response.status_code}",
                                    request=response.request, response=response)
    model = _json(response).get("model")
    if not isinstance(model, str):  # a server whose /health does not say: ask /v1/models
        listed = await client.get(replica.url + "/v1/models",
                                  timeout=state.config.health.timeout,
                                  headers=pool.upstream_headers())
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
    """Probe one replica and record the outcome; a replica going down is logged once."""
    try:
        await probe(state, replica, pool)
    except (httpx.HTTPError, ValueError) as exc:
        if replica.healthy is not False:
            log.warning("expert %s replica %s failed its health check: %s", pool.name,
                        replica.url, describe_error(exc))
        replica.healthy, replica.last_error = False, f"health: {describe_error(exc)}"
        return False
    replica.healthy = True
    return True


async def check_all(state: RouterState) -> None:
    await asyncio.gather(*(check_replica(state, pool, r) for pool in state.pools.values()
                           for r in pool.replicas))


async def health_loop(state: RouterState) -> None:
    """Check every replica every `health.interval` seconds until cancelled."""
    while True:
        await asyncio.sleep(state.config.health.interval)
        try:
            await check_all(state)
        except Exception:  # a bug here must not stop the checks for good
            log.exception("health checks failed")


def health_report(state: RouterState) -> tuple[dict[str, Any], int]:
    """The router's `/health` body and status: ok when every expert has a usable replica,
    degraded when some have, down (503) when none has."""
    experts = {name: {"available": pool.available(),
                      "replicas": [r.to_json() for r in pool.replicas]}
               for name, pool in state.pools.items()}
    up = [name for name, e in experts.items() if e["available"]]
    status = "ok" if len(up) == len(experts) else ("degraded" if up else "down")
    return ({"status": status, "fallback": state.config.fallback,
             "routing": state.config.routing.method, "experts": experts},
            200 if up else 503)
