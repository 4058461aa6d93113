"""`largeforge serve inference`: one model over the OpenAI-compatible API (uvicorn + FastAPI).

`serve_app` is the `serve` group; `cli/router_cmd.py` adds `serve router` to it. The library
does the work: `largeforge.serve` (`largeforge.server.serve`) checks the options, binds the
socket (so `--port 0` works and the real port is printed), loads the model into
`largeforge.serving.app.create_app` and runs uvicorn; this module passes the flags and prints.
"""

from __future__ import annotations

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
    from largeforge.server import serve

    err = Console(stderr=True, highlight=False)
    serve(model, host, port, api_keys=api_key, api_key_file=api_key_file,
          served_model_name=served_model_name, max_batch_size=max_batch_size,
          max_queue=max_queue, rate_limit=rate_limit, chat_template=chat_template,
          device=device, threads=threads, access_log=access_log, on_status=err.print)


def register(app: typer.Typer) -> None:
    app.add_typer(serve_app, name="serve")
