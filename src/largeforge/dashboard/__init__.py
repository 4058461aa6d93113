"""`largeforge dashboard`: a web app to launch, watch, compare, try and ship runs.

    app.py          the FastAPI app: pages (Jinja2 templates/) and the JSON + event-stream API
    auth.py         the token required off loopback
    runs_view.py    the runs table, a run's page and comparisons, read from the registry and
                    run directories (never failing on a bad one)
    launch_form.py  the launch form from the recipe schema and the CLI's flag tables
    control.py      the actions: launch, stop, resume, cleanup, eval, export, serve
    jobs.py         the processes those start, detached from the dashboard
    playground.py   the chat playground (one model loaded, replies streamed)
    proofs.py       an export loaded and run in its runtime
    static/         dashboard.css, dashboard.js; plotly.js is served from the plotly package

It sits beside `cli/` in the layers: another front end over the same library, reusing the CLI's
flag tables so the form and the commands cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

DEFAULT_PORT = 7860


def serve_dashboard(
    host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, token: str | None = None,
    registry: Path | None = None, runs_dir: Path = Path("runs"),
    on_status: Callable[[str], None] | None = None,
) -> None:
    """Serve the dashboard until interrupted. Off loopback a token is required (`--token` or
    $LARGEFORGE_DASHBOARD_TOKEN). Servers it started stop with it; training runs go on."""
    import uvicorn

    from largeforge.dashboard.app import create_app
    from largeforge.dashboard.auth import dashboard_token
    from largeforge.dashboard.control import Dashboard
    from largeforge.server import bind_socket

    say = on_status or (lambda message: None)
    required = dashboard_token(host, token)
    dashboard = Dashboard.create(registry, runs_dir)
    sock = bind_socket(host, port)
    try:
        app = create_app(dashboard, required)
        bound = sock.getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        say(f"dashboard on http://{shown}:{bound[1]}/"
            + ("?token=..." if required else "") + f" (runs in {dashboard.runs_dir}, registry "
            f"{dashboard.registry.path})")
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        dashboard.jobs.stop_all_servers()
        sock.close()
