"""`largeforge serve inference`: one model over the OpenAI-compatible API (uvicorn + FastAPI).

`serve_app` is the `serve` group; `cli/router_cmd.py` adds `serve router` to it. The library
does the work (`largeforge.serving.app.create_app`); this module checks the flags, loads the
model, binds the socket (so `--port 0` works and the real port is printed) and runs uvicorn.
"""

from __future__ import annotations

import gc
import socket
import sys
from pathlib import Path

import typer
from rich.console import Console

serve_app = typer.Typer(help="Serve models over an OpenAI-compatible HTTP API.",
                        no_args_is_help=True)


@serve_app.command("inference")
def inference_command(
    model: str = typer.Option(
        ..., "--model", "-m", help="Model directory, run directory or hub id."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="Port to listen on; 0 picks a free one."),
    api_key: list[str] = typer.Option(
        [], "--api-key", help="An accepted API key (repeatable). Also read from "
        "LARGEFORGE_API_KEYS (comma-separated) and --api-key-file.",
    ),
    api_key_file: Path | None = typer.Option(
        None, "--api-key-file", help="A file of accepted API keys, one per line."
    ),
    served_model_name: str | None = typer.Option(
        None, "--served-model-name",
        help="The model name clients use (default: the directory's name, or the hub id).",
    ),
    max_batch_size: int = typer.Option(16, "--max-batch-size", help="Requests decoded together."),
    max_queue: int = typer.Option(
        256, "--max-queue", help="Requests waiting for a batch slot; more are answered 503."
    ),
    rate_limit: float | None = typer.Option(
        None, "--rate-limit", help="Requests per minute per API key (per client address "
        "without keys); more are answered 429. Default: no limit.",
    ),
    chat_template: str | None = typer.Option(
        None, "--chat-template", help="A built-in chat template or a Jinja file for "
        "/v1/chat/completions (default: the tokenizer's own).",
    ),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda or mps (default: best)."),
    threads: int | None = typer.Option(
        None, "--threads", help="CPU threads for the model (default: torch's, one per core). "
        "Fewer leave cores to the HTTP side and to other processes on the machine.",
    ),
    access_log: bool = typer.Option(False, "--access-log", help="Log every request to stderr."),
) -> None:
    """Serve a model: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""
    import uvicorn

    from largeforge.errors import LargeForgeError
    from largeforge.runs import resolve_model_dir
    from largeforge.serving.auth import RateLimiter, load_api_keys

    err = Console(stderr=True, highlight=False)
    # Everything that can be wrong with the flags fails before the (slow) model load.
    if not 1 <= max_batch_size <= 4096:
        raise LargeForgeError(f"--max-batch-size must be in 1..4096, got {max_batch_size}")
    if max_queue < 1:
        raise LargeForgeError(f"--max-queue must be >= 1, got {max_queue}")
    if threads is not None and threads < 1:
        raise LargeForgeError(f"--threads must be >= 1, got {threads}")
    if not 0 <= port <= 65535:
        raise LargeForgeError(f"--port must be in 0..65535, got {port}")
    if rate_limit is not None:
        RateLimiter(rate_limit)  # checks the value
    keys = load_api_keys(api_key, api_key_file)
    resolved = resolve_model_dir(model)
    template = None
    if chat_template:
        from largeforge.inference.chat import resolve_chat_template  # imports torch: slow

        template = resolve_chat_template(chat_template)
    name = served_model_name or default_model_name(model)
    sock = bind_socket(host, port)  # before loading: a busy port fails at once
    try:
        app = _build_app(resolved, name, device, threads, keys, rate_limit, template,
                         max_batch_size, max_queue, err)
        config = uvicorn.Config(app, log_level="warning", access_log=access_log,
                                timeout_graceful_shutdown=5)
        bound = sock.getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        err.print(f"serving {name} on http://{shown}:{bound[1]}/v1 "
                  f"({'API keys required' if keys else 'no API key needed'})")
        sys.stderr.flush()
        # The loaded libraries and model never become garbage: keeping them out of the
        # collector's passes shortens its pauses while serving, and the exit by seconds.
        gc.freeze()
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()


def default_model_name(model: str) -> str:
    """The name clients use by default: the directory's name as given (`runs/my-run` is
    `my-run`, not the `final` inside it), or the hub id."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (IPv6 when the host has a colon), as uvicorn binds it,
    but failing with a LargeForgeError instead of logging and exiting."""
    from largeforge.errors import LargeForgeError

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


def _build_app(
    resolved: str, name: str, device: str | None, threads: int | None, keys: list[str],
    rate_limit: float | None, template: str | None, max_batch_size: int, max_queue: int,
    err: Console,
) -> object:
    import time

    import torch

    from largeforge.inference.engine import ContinuousBatchingEngine
    from largeforge.inference.generate import load_for_inference, model_eos_ids
    from largeforge.serving.app import create_app

    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    err.print(f"loading {resolved} ...")
    model, tokenizer = load_for_inference(resolved, device)
    err.print(f"loaded in {time.perf_counter() - start:.1f} s")
    engine = ContinuousBatchingEngine(
        model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue,
        eos_token_ids=model_eos_ids(model, tokenizer),  # as `largeforge generate` stops
    )
    return create_app(engine, tokenizer, name, api_keys=keys, rate_limit=rate_limit,
                      chat_template=template)


def register(app: typer.Typer) -> None:
    app.add_typer(serve_app, name="serve")
