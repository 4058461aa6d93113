"""`largeforge dashboard`: the web app over the runs registry and run directories."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console


def dashboard_command(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; any but a "
                             "loopback one needs a token."),
    port: int = typer.Option(7860, "--port", help="Port to listen on; 0 picks a free one."),
    token: str | None = typer.Option(
        None, "--token", help="Required on every request (default: "
        "$LARGEFORGE_DASHBOARD_TOKEN); needed off loopback."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir",
                                  help="Where launched runs go, and runs are looked for."),
    registry: Path | None = typer.Option(
        None, "--registry", help="Registry database (default: $LARGEFORGE_REGISTRY, else "
        "~/.largeforge/registry.db)."),
) -> None:
    """Web app: watch runs live, launch, stop and resume them, compare, chat, eval, export,
    serve."""
    from largeforge.dashboard import serve_dashboard
    from largeforge.errors import LargeForgeError

    if not 0 <= port <= 65535:
        raise LargeForgeError(f"--port must be in 0..65535, got {port}")
    err = Console(stderr=True, highlight=False)
    serve_dashboard(host, port, token=token, registry=registry, runs_dir=runs_dir,
                    on_status=lambda line: (err.print(line, soft_wrap=True),
                                            err.file.flush()))


def register(app: typer.Typer) -> None:
    app.command("dashboard")(dashboard_command)
