"""The expert router: one OpenAI-compatible endpoint in front of several expert servers.

    config = load_router_config("router.yaml")
    with LocalReplicas(config) as local:            # starts `serve inference` for model experts
        app = create_router_app(config, local_urls=local.urls)
        uvicorn.run(app, host="127.0.0.1", port=8000)

(`serve_router` does exactly that; `largeforge serve router --config router.yaml` calls it.)

This module is the app: its routes, its lifespan (the HTTP client to the experts and the health
checks run while it serves) and the process around it. The work is done next door:
`router_proxy` (routing, retries, fallback, streams), `router_pools` (replicas and circuit
breakers), `router_health`, `router_metrics`, `router_replicas` (the servers the router starts).

The router loads no model: it is a small process of its own (with keyword routing it does not
even import torch; skops, which loads the classifier, imports scikit-learn, which imports it).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from largeforge.serving.errors import install_error_handlers, model_not_found
from largeforge.serving.http import authorizer
from largeforge.serving.openai_schema import ModelCard, ModelList
from largeforge.serving.router_config import RouterConfig, load_router_config
from largeforge.serving.router_health import check_all, health_loop, health_report
from largeforge.serving.router_proxy import AUTO_MODEL, EXPERT_HEADER, proxy
from largeforge.serving.router_replicas import LocalReplicas
from largeforge.serving.router_state import RouterState


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
    authorize = authorizer(api_keys, rate_limit)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        up = config.upstream
        state.client = httpx.AsyncClient(
            timeout=httpx.Timeout(up.timeout, connect=up.connect_timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        await check_all(state)
        checker = asyncio.create_task(health_loop(state))
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
        body, status = health_report(state)
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics() -> Response:
        payload, content_type = state.metrics.render()
        return Response(payload, media_type=content_type)

    return app


class _ExpertHeaderMiddleware:
    """Every /v1 response names the expert that answered (`none` when none did): also the
    errors answered before a request reached the proxy (a bad key, a bad body)."""

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
