"""The dashboard's web app: server-rendered pages (Jinja2) over a JSON API, with server-sent
events for everything that moves (the runs table, a run's curves, a chat reply). See
docs/architecture.md for why this stack.

The app holds no state of its own that matters: runs are read from the registry and their
directories on every request, and what it starts runs in processes of their own (`jobs.py`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from largeforge.dashboard.auth import COOKIE, token_matches
from largeforge.dashboard.control import EXPORT_FORMATS, Dashboard
from largeforge.dashboard.launch_form import COMMAND_TITLES, COMMANDS, form_fields
from largeforge.dashboard.playground import PLAIN, ChatRequest, Playground
from largeforge.dashboard.runs_view import (
    compare_runs,
    list_runs,
    run_detail,
)
from largeforge.errors import LargeForgeError
from largeforge.runs import MetricsTail, RunDir, live_status
from largeforge.text_files import json_safe
from largeforge.version import __version__

HERE = Path(__file__).parent
FINAL_STATUSES = ("completed", "stopped_early", "stopped", "failed", "dead", "missing")


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(json_safe(data), default=str)}\n\n"


def plotly_js() -> Path:
    """plotly.js as the plotly package ships it: served from here, never from a CDN."""
    return Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))


def create_app(dashboard: Dashboard, token: str | None = None) -> FastAPI:
    app = FastAPI(title="LargeForge dashboard", version=__version__, docs_url=None,
                  redoc_url=None, openapi_url="/api/openapi.json")
    app.state.dashboard = dashboard
    app.state.playground = Playground()
    pages = Environment(loader=FileSystemLoader(HERE / "templates"),
                        autoescape=select_autoescape(["html"]))
    if token is not None:
        _add_token_check(app, token)

    @app.exception_handler(LargeForgeError)
    async def refused(request: Request, exc: LargeForgeError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    def page(name: str, **context: Any) -> HTMLResponse:
        html = pages.get_template(name).render(version=__version__, **context)
        return HTMLResponse(html)

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.get("/vendor/plotly.min.js", include_in_schema=False)
    def plotly() -> FileResponse:
        return FileResponse(plotly_js(), media_type="text/javascript",
                            headers={"Cache-Control": "max-age=86400"})

    @app.get("/", response_class=HTMLResponse)
    def runs_page() -> HTMLResponse:
        listing = list_runs(dashboard.registry, dashboard.runs_dir)
        return page("runs.html", active="runs", rows=listing.rows, notice=listing.notice)

    @app.get("/run", response_class=HTMLResponse)
    def run_page(dir: str) -> HTMLResponse:
        detail = run_detail(dashboard.registry, dir)
        return page("run.html", active="runs", d=detail, formats=EXPORT_FORMATS)

    @app.get("/compare", response_class=HTMLResponse)
    def compare_page(dir: list[str] = Query(default=[])) -> HTMLResponse:
        listing = list_runs(dashboard.registry, dashboard.runs_dir)
        data = compare_runs(dashboard.registry, dir) if len(dir) >= 2 else None
        return page("compare.html", active="compare", rows=listing.rows, chosen=dir, c=data)

    @app.get("/launch", response_class=HTMLResponse)
    def launch_page(command: str = "train") -> HTMLResponse:
        if command not in COMMANDS:
            command = "train"
        return page("launch.html", active="launch", command=command, titles=COMMAND_TITLES,
                    fields=form_fields(command), runs_dir=dashboard.runs_dir)

    @app.get("/try", response_class=HTMLResponse)
    def try_page(model: str = "", run: str = "") -> HTMLResponse:
        listing = list_runs(dashboard.registry, dashboard.runs_dir)
        models = _all_models(listing.rows)
        return page("try.html", active="try", models=models, model=model, run=run,
                    formats=EXPORT_FORMATS, plain=PLAIN)

    @app.get("/serving", response_class=HTMLResponse)
    def serving_page() -> HTMLResponse:
        return page("serving.html", active="serving", experts=_experts(dashboard))

    _add_api(app, dashboard)
    return app


def _add_token_check(app: FastAPI, token: str) -> None:
    @app.middleware("http")
    async def check_token(request: Request, call_next: Any) -> Response:
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else None
        from_query = request.query_params.get("token")
        for candidate in (given, request.cookies.get(COOKIE), from_query):
            if token_matches(candidate, token):
                response: Response = await call_next(request)
                if candidate is from_query:
                    response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
                return response
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": "a valid dashboard token is required"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return HTMLResponse("<h1>401</h1><p>This dashboard needs its token: open it as "
                            "<code>/?token=...</code>.</p>", status_code=401)


def _all_models(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    from largeforge.dashboard.runs_view import run_models

    models: list[dict[str, str]] = []
    for row in rows:
        if row["status"] != "missing":
            models += run_models(RunDir(row["dir"]))
    return models


def _experts(dashboard: Dashboard) -> list[dict[str, Any]]:
    try:
        return [e.to_json() for e in dashboard.registry.list_experts()]
    except Exception:  # noqa: BLE001 - a locked or damaged registry: no experts shown
        return []


def _add_api(app: FastAPI, dashboard: Dashboard) -> None:
    playground: Playground = app.state.playground

    @app.get("/api/runs")
    def api_runs() -> JSONResponse:
        listing = list_runs(dashboard.registry, dashboard.runs_dir)
        return JSONResponse(json_safe({"runs": listing.rows, "notice": listing.notice}))

    @app.get("/api/runs/events")
    async def api_runs_events(request: Request) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            last = None
            while not await request.is_disconnected():
                listing = await asyncio.to_thread(list_runs, dashboard.registry,
                                                  dashboard.runs_dir)
                body = {"runs": listing.rows, "notice": listing.notice}
                text = json.dumps(json_safe(body), default=str)
                if text != last:
                    last = text
                    yield f"event: runs\ndata: {text}\n\n"
                await asyncio.sleep(1.0)
        return _stream(events())

    @app.get("/api/run")
    def api_run(dir: str) -> JSONResponse:
        d = run_detail(dashboard.registry, dir)
        return JSONResponse(json_safe({
            "row": d.row, "state": d.state, "recipe_text": d.recipe_text,
            "checkpoints": d.checkpoints, "evals": d.evals, "actions": d.actions,
            "models": d.models}))

    @app.get("/api/run/metrics")
    async def api_run_metrics(request: Request, dir: str) -> StreamingResponse:
        return _stream(_metric_events(request, dir, dashboard))

    @app.get("/api/compare")
    def api_compare(dir: list[str] = Query(default=[])) -> JSONResponse:
        if len(dir) < 2:
            raise LargeForgeError("pick at least two runs to compare")
        return JSONResponse(json_safe(compare_runs(dashboard.registry, dir)))

    @app.get("/api/launch/form")
    def api_form(command: str) -> JSONResponse:
        if command not in COMMANDS:
            raise LargeForgeError(f"unknown command {command!r}")
        return JSONResponse(json_safe([f.__dict__ for f in form_fields(command)]))

    @app.post("/api/launch")
    def api_launch(body: dict[str, Any]) -> JSONResponse:
        values = {k: str(v) for k, v in (body.get("values") or {}).items() if v is not None}
        launch, job = dashboard.launch(str(body.get("command", "")), values)
        if job is None:
            return JSONResponse({"errors": launch.errors}, status_code=422)
        return JSONResponse({"job": job.to_json(), "run_dir": str(launch.run_dir)})

    @app.post("/api/run/stop")
    def api_stop(body: dict[str, Any]) -> JSONResponse:
        return JSONResponse({"message": dashboard.stop(str(body.get("dir", "")))})

    @app.post("/api/run/resume")
    def api_resume(body: dict[str, Any]) -> JSONResponse:
        return JSONResponse({"job": dashboard.resume(str(body.get("dir", ""))).to_json()})

    @app.post("/api/run/cleanup")
    def api_cleanup(body: dict[str, Any]) -> JSONResponse:
        return JSONResponse({"message": dashboard.cleanup(str(body.get("dir", "")))})

    _add_model_api(app, dashboard, playground)


def _add_model_api(app: FastAPI, dashboard: Dashboard, playground: Playground) -> None:
    @app.get("/api/model")
    def api_model(model: str) -> JSONResponse:
        return JSONResponse(playground.describe(model))

    @app.post("/api/chat")
    def api_chat(body: dict[str, Any]) -> StreamingResponse:
        request = ChatRequest(
            model=str(body.get("model", "")), messages=list(body.get("messages") or []),
            template=body.get("template") or None,
            temperature=float(body.get("temperature", 0.7)),
            top_p=float(body.get("top_p", 0.95)),
            max_new_tokens=int(body.get("max_new_tokens", 128)),
            seed=body.get("seed"),
        )

        def pieces() -> Iterator[str]:
            try:
                for piece in playground.stream(request):
                    yield sse("token", {"text": piece})
            except (LargeForgeError, OSError, ValueError) as exc:
                yield sse("error", {"error": str(exc)})
                return
            yield sse("done", {})
        return _stream(pieces())

    @app.post("/api/eval")
    def api_eval(body: dict[str, Any]) -> JSONResponse:
        job = dashboard.evaluate(str(body.get("model", "")), str(body.get("data", "")),
                                 int(body.get("max_examples", 50)), body.get("run") or None)
        return JSONResponse({"job": job.to_json()})

    @app.post("/api/export")
    def api_export(body: dict[str, Any]) -> JSONResponse:
        job = dashboard.export(str(body.get("model", "")), str(body.get("format", "")),
                               body.get("run") or None)
        return JSONResponse({"job": job.to_json()})

    @app.post("/api/serve")
    def api_serve(body: dict[str, Any]) -> JSONResponse:
        job = dashboard.serve(str(body.get("model", "")), body.get("run") or None)
        return JSONResponse({"job": job.to_json()})

    @app.post("/api/serve/stop")
    def api_serve_stop(body: dict[str, Any]) -> JSONResponse:
        return JSONResponse({"job": dashboard.stop_server(str(body.get("job", ""))).to_json()})

    @app.get("/api/jobs")
    def api_jobs(kind: str | None = None) -> JSONResponse:
        return JSONResponse(json_safe([j.to_json() for j in dashboard.jobs.list(kind)]))

    @app.get("/api/jobs/{job_id}")
    def api_job(job_id: str) -> JSONResponse:
        try:
            return JSONResponse(json_safe(dashboard.jobs.get(job_id).to_json()))
        except KeyError:
            return JSONResponse({"error": f"no job {job_id}"}, status_code=404)

    @app.get("/api/experts")
    def api_experts() -> JSONResponse:
        return JSONResponse(_experts(dashboard))

    @app.get("/api/router")
    def api_router(url: str) -> JSONResponse:
        return JSONResponse(router_state(url))


def router_state(url: str) -> dict[str, Any]:
    """A running router's `/health` (its experts, replicas and their breakers), fetched here so
    the page needs no cross-origin request; 503 (no expert available) is a state too."""
    import urllib.error
    import urllib.request

    if not url.startswith(("http://", "https://")):
        raise LargeForgeError(f"a router URL starts with http:// or https://, not {url!r}")
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=3) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise LargeForgeError(f"no router answers at {url}: {exc}") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise LargeForgeError(f"{url}/health did not answer JSON: is it a LargeForge router?"
                              ) from None
    if not isinstance(data, dict) or "experts" not in data:
        raise LargeForgeError(f"{url}/health is not a LargeForge router's")
    return data


def _stream(events: Any) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _metric_events(request: Request, run_dir: str,
                         dashboard: Dashboard) -> AsyncIterator[str]:
    """Every record of the run's metrics, then each new one as the run appends it (only the
    new bytes are read), with the run's status whenever it changes; ends after the run has
    ended and its last records are sent."""
    tail = MetricsTail(RunDir(run_dir).metrics)
    last_status: dict[str, Any] | None = None
    try:
        while not await request.is_disconnected():
            records = list(tail.read_new())
            if records:
                yield sse("records", records)
            status = _status(run_dir, dashboard)
            if status != last_status:
                last_status = status
                yield sse("status", status)
            if status["status"] in FINAL_STATUSES and not records:
                yield sse("end", status)
                return
            await asyncio.sleep(0.5)
    finally:
        tail.close()


def _status(run_dir: str, dashboard: Dashboard) -> dict[str, Any]:
    """The run's status; `starting` while a job launched (or resumed) for it has not yet
    said it is running."""
    run = RunDir(run_dir)
    starting = any(j.run_dir == str(run.path) and j.status == "running"
                   for j in dashboard.jobs.list("train"))
    if not run.path.is_dir() or not run.state_file.is_file():
        return {"status": "starting" if starting else "missing"}
    try:
        state = run.read_state()
    except ValueError:
        state = {}
    status = live_status(run.path)
    if starting and status in FINAL_STATUSES:
        status = "starting"
    return {"status": status, "step": state.get("step"),
            "max_steps": state.get("max_steps"), "error": state.get("error")}
