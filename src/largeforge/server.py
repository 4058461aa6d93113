"""`serve`: one model over the OpenAI-compatible HTTP API, as `largeforge serve inference` runs it.

`build_server_app` loads the model into a continuous-batching engine and returns the FastAPI app
(`largeforge.serving.app.create_app`), for callers that run it their own way (a test client,
another ASGI server); `serve` checks every option before the (slow) model load, binds the socket
(so port 0 works and the real port is known), builds the app and runs uvicorn until stopped.
`largeforge.serving.router_app.serve_router` is the same for the router in front of experts.
"""

from __future__ import annotations

import gc
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from largeforge.errors import LargeForgeError


def default_model_name(model: str) -> str:
    """The name clients use by default: the directory's name as given (`runs/my-run` is
    `my-run`, not the `final` inside it), or the hub id."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (IPv6 when the host has a colon), as uvicorn binds it,
    but failing with a LargeForgeError instead of logging and exiting."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise LargeForgeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _check_options(max_batch_size: int, max_queue: int, threads: int | None,
                   port: int | None, rate_limit: float | None) -> None:
    from largeforge.serving.auth import RateLimiter

    if not 1 <= max_batch_size <= 4096:
        raise LargeForgeError(f"--max-batch-size must be in 1..4096, got {max_batch_size}")
    if max_queue < 1:
        raise LargeForgeError(f"--max-queue must be >= 1, got {max_queue}")
    if threads is not None and threads < 1:
        raise LargeForgeError(f"--threads must be >= 1, got {threads}")
    if port is not None and not 0 <= port <= 65535:
        raise LargeForgeError(f"--port must be in 0..65535, got {port}")
    if rate_limit is not None:
        RateLimiter(rate_limit)  # checks the value


def build_server_app(
    model: str | Path,
    *,
    served_model_name: str | None = None,
    api_keys: Sequence[str] = (),
    rate_limit: float | None = None,
    chat_template: str | None = None,
    max_batch_size: int = 16,
    max_queue: int = 256,
    device: str | None = None,
    threads: int | None = None,
    on_status: Callable[[str], None] | None = None,
) -> Any:
    """The FastAPI app serving `model` (a model dir, run dir or hub id): /v1/completions,
    /v1/chat/completions, /v1/models, /health, /metrics. `api_keys` are the accepted keys
    (none: open); `chat_template` a built-in name or Jinja file. Loads the model."""
    from largeforge.runs import resolve_model_dir

    _check_options(max_batch_size, max_queue, threads, None, rate_limit)
    resolved = resolve_model_dir(str(model))
    template = _template(chat_template)
    name = served_model_name or default_model_name(str(model))
    return _build_app(resolved, name, device, threads, list(api_keys), rate_limit, template,
                      max_batch_size, max_queue, on_status or (lambda message: None))


def serve(
    model: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    api_keys: Sequence[str] = (),
    api_key_file: str | Path | None = None,
    served_model_name: str | None = None,
    max_batch_size: int = 16,
    max_queue: int = 256,
    rate_limit: float | None = None,
    chat_template: str | None = None,
    device: str | None = None,
    threads: int | None = None,
    access_log: bool = False,
    on_status: Callable[[str], None] | None = None,
) -> None:
    """Serve `model` over the OpenAI-compatible API on host:port (0 picks a free port) until
    interrupted; `largeforge serve inference` is this function.

    Accepted API keys are `api_keys`, those in `api_key_file` (one a line) and those in
    LARGEFORGE_API_KEYS (comma-separated); none: open. `rate_limit`: requests per minute per key
    (per client address without keys). `max_batch_size` requests are decoded together,
    `max_queue` more wait (beyond: 503). `threads`: CPU threads for the model.
    `on_status(message)` hears the loading and "serving NAME on http://HOST:PORT/v1" lines.
    Every option is checked, and the port bound, before the model is loaded.
    """
    import uvicorn

    from largeforge.runs import resolve_model_dir
    from largeforge.serving.auth import load_api_keys

    say = on_status or (lambda message: None)
    # Everything that can be wrong with the options fails before the (slow) model load.
    _check_options(max_batch_size, max_queue, threads, port, rate_limit)
    keys = load_api_keys(list(api_keys), Path(api_key_file) if api_key_file else None)
    resolved = resolve_model_dir(str(model))
    template = _template(chat_template)
    name = served_model_name or default_model_name(str(model))
    sock = bind_socket(host, port)  # before loading: a busy port fails at once
    try:
        app = _build_app(resolved, name, device, threads, keys, rate_limit, template,
                         max_batch_size, max_queue, say)
        config = uvicorn.Config(app, log_level="warning", access_log=access_log,
                                timeout_graceful_shutdown=5)
        bound = sock.getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        say(f"serving {name} on http://{shown}:{bound[1]}/v1 "
            f"({'API keys required' if keys else 'no API key needed'})")
        sys.stderr.flush()
        # The loaded libraries and model never become garbage: keeping them out of the
        # collector's passes shortens its pauses while serving, and the exit by seconds.
        gc.freeze()
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def _template(chat_template: str | None) -> str | None:
    if not chat_template:
        return None
    from largeforge.inference.chat import resolve_chat_template  # imports torch: slow

    return resolve_chat_template(chat_template)


def _build_app(
    resolved: str, name: str, device: str | None, threads: int | None, keys: list[str],
    rate_limit: float | None, template: str | None, max_batch_size: int, max_queue: int,
    say: Callable[[str], None],
) -> Any:
    import torch

    from largeforge.inference.engine import ContinuousBatchingEngine
    from largeforge.inference.generate import load_for_inference, model_eos_ids
    from largeforge.serving.app import create_app

    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    say(f"loading {resolved} ...")
    model, tokenizer = load_for_inference(resolved, device)
    say(f"loaded in {time.perf_counter() - start:.1f} s")
    engine = ContinuousBatchingEngine(
        model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue,
        eos_token_ids=model_eos_ids(model, tokenizer),  # as `largeforge generate` stops
    )
    return create_app(engine, tokenizer, name, api_keys=keys, rate_limit=rate_limit,
                      chat_template=template)
