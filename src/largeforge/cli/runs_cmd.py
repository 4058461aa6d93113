"""`largeforge runs list | show | logs | report`: the runs registry and a run's files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

runs_app = typer.Typer(
    help="Runs: list the registry, show one run, print or follow its metrics.",
    no_args_is_help=True,
)

RegistryOpt = typer.Option(
    None, "--registry", help="Registry database (default: $LARGEFORGE_REGISTRY, else "
    "~/.largeforge/registry.db).",
)
RunArg = typer.Argument(..., help="A run: its name in the registry or its directory.")
JsonOpt = typer.Option(False, "--json", help="Print JSON instead of a table.")

_STATUS_STYLE = {"running": "cyan", "completed": "green", "stopped_early": "green",
                 "stopped": "yellow",
                 "failed": "red", "dead": "red"}


def _console() -> Console:
    # Wide when not a terminal, so paths in tables are not cut for pipes and files.
    probe = Console()
    return Console(highlight=False, width=None if probe.is_terminal else 200)


def _registry(path: Path | None) -> Any:
    from largeforge.runs import Registry

    return Registry(path, create=False)


@runs_app.command("list")
def list_command(
    status: str | None = typer.Option(
        None, "--status", help="Only runs with this status: running, completed, stopped_early, "
        "stopped, failed or dead (marked running, its process gone)."
    ),
    limit: int | None = typer.Option(None, "--limit", help="At most this many runs."),
    registry: Path | None = RegistryOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Every run in the registry, most recently updated first."""
    from largeforge.runs import format_time

    reg = _registry(registry)
    records = reg.list_runs(status=status, limit=limit)
    if as_json:
        typer.echo(json.dumps([r.to_json() for r in records], indent=2))
        return
    console = _console()
    if not records:
        console.print(f"no runs in {reg.path}" + (f" with status {status}" if status else ""))
        return
    table = Table(title=f"runs ({reg.path})")
    for column in ("name", "status", "steps", "best", "updated", "path"):
        table.add_column(column, overflow="fold")
    for r in records:
        shown = r.shown_status
        table.add_row(
            r.name, f"[{_STATUS_STYLE.get(shown, 'white')}]{shown}[/]", _steps(r.step, r.max_steps),
            _best(r.best_metric, r.best_value, r.best_step), format_time(r.updated), r.run_dir,
        )
    console.print(table)


@runs_app.command("show")
def show_command(
    run: str = RunArg,
    registry: Path | None = RegistryOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Everything about one run: registry row, run.json and last metrics.

    A run directory that is not in the registry is shown from its files."""
    from largeforge.runs import (
        RunDir,
        format_record,
        format_time,
        last_records,
        live_status,
        read_records,
    )

    run_dir, record = _resolve(run, registry)
    state = _run_state(run_dir)
    last = last_records(read_records(run_dir))
    status = live_status(run_dir, record)
    if as_json:
        typer.echo(json.dumps({
            "run_dir": str(run_dir), "status": status,
            "registry": record.to_json() if record else None, "run_json": state,
            "last_metrics": last,
        }, indent=2))
        return
    console = _console()
    table = Table(title=f"run {run_dir.name}", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")

    def row(key: str, value: Any) -> None:
        if value not in (None, ""):
            table.add_row(key, str(value))

    row("path", run_dir if run_dir.is_dir() else f"{run_dir} (no longer exists)")
    row("status", f"[{_STATUS_STYLE.get(status, 'white')}]{status}[/]")
    if record is None:
        row("registry", "not in the registry")
        row("error", state.get("error"))
    else:
        row("error", record.error)
        row("created", format_time(record.created))
        row("updated", format_time(record.updated))
        row("recipe sha256", record.recipe_hash)
        row("objective", record.objective)
        row("method", record.method)
        row("model", record.model_source)
    row("steps", _steps(state.get("step", record.step if record else None),
                        state.get("max_steps", record.max_steps if record else None)))
    if record is not None and record.best_metric:
        row("best", _best(record.best_metric, record.best_value, record.best_step))
    elif state.get("best_val_loss") is not None:
        row("best", _best("val_loss", state["best_val_loss"], state.get("best_step")))
    if record is None:
        row("method", state.get("method"))
    row("parameters", f"{state['parameters']:,}" if state.get("parameters") else None)
    hardware = state.get("hardware") or {}
    if hardware:
        row("hardware", f"{hardware.get('device')} ({hardware.get('device_name')}), "
                        f"{hardware.get('precision')}")
    if state.get("median_tokens_per_s"):
        row("median tokens/s", f"{state['median_tokens_per_s']:,.0f}")
    if state.get("median_mfu") is not None:
        row("median MFU", f"{100 * state['median_mfu']:.1f}%")
    run_files = RunDir(run_dir)
    for path in (run_files.best, run_files.final):
        row(f"{path.name}/", path if path.is_dir() else None)
    row("latest checkpoint", run_files.latest_checkpoint())
    if record is not None and record.pid:
        row("process", f"pid {record.pid}" + (f" on {record.hostname}" if record.hostname else ""))
    row("last train", format_record(last["train"]) if last["train"] else "no record yet")
    row("last eval", format_record(last["eval"]) if last["eval"] else None)
    console.print(table)


@runs_app.command("logs")
def logs_command(
    run: str = RunArg,
    follow: bool = typer.Option(
        False, "--follow", "-f", help="Keep printing new records until the run stops (Ctrl-C "
        "leaves)."
    ),
    interval: float = typer.Option(0.5, "--interval", help="Seconds between looks (--follow)."),
    registry: Path | None = RegistryOpt,
) -> None:
    """A run's metrics.jsonl as readable lines; with --follow, as they are written."""
    from largeforge.errors import LargeForgeError
    from largeforge.runs import follow_records, format_record, live_status, read_records

    if interval <= 0:
        raise LargeForgeError(f"--interval must be above 0 seconds, not {interval}")
    run_dir, record = _resolve(run, registry)
    if not follow:
        records = read_records(run_dir)
        for item in records:
            typer.echo(format_record(item))
        if not records:
            typer.echo(f"{run_dir}: no metrics yet")
        return

    def refreshed() -> Any:
        if record is None:
            return None
        try:
            return _registry(registry).find_run(record.run_dir)
        except LargeForgeError:  # the registry is only a second opinion here
            return record

    try:
        for item in follow_records(
            run_dir, lambda: live_status(run_dir, refreshed()) == "running", interval=interval
        ):
            typer.echo(format_record(item))
    except KeyboardInterrupt:
        return
    status = live_status(run_dir, refreshed())
    error = _run_state(run_dir).get("error")
    typer.echo(f"run {run_dir.name} is {status}" + (f": {error}" if error else ""))


@runs_app.command("report")
def report_command(
    run: str = RunArg,
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Where to write the HTML (default: RUN/report.html)."
    ),
    registry: Path | None = RegistryOpt,
) -> None:
    """Write the run's report.html again (curves, eval table, checkpoints, recipe, hardware):
    training writes one at its end; this one also works on a running or killed run."""
    from largeforge.runs.report import write_run_report

    run_dir, _ = _resolve(run, registry)
    path = write_run_report(run_dir, output)
    typer.echo(f"wrote {path}")


def _resolve(run: str, registry: Path | None) -> tuple[Path, Any]:
    """(run directory, registry row or None). A path not in the registry is fine; a name
    must be in it."""
    from largeforge.runs import resolve_run_dir

    reg = _registry(registry)
    run_dir = resolve_run_dir(run, reg)
    return run_dir, reg.find_run(run_dir)


def _run_state(run_dir: Path) -> dict[str, Any]:
    """run.json for display: a damaged one shows as empty (the registry row and the metrics
    still say what they know; `runs report` is where the damage is reported)."""
    from largeforge.runs import RunDir, RunStateError

    try:
        return RunDir(run_dir).read_state()
    except RunStateError:
        return {}


def _steps(step: int | None, max_steps: int | None) -> str:
    if step is None:
        return ""
    return f"{step:,}/{max_steps:,}" if max_steps else f"{step:,}"


def _best(metric: str | None, value: float | None, step: int | None) -> str:
    if not metric or value is None:
        return ""
    return f"{metric} {value:.4f}" + (f" @ {step}" if step is not None else "")


def register(app: typer.Typer) -> None:
    app.add_typer(runs_app, name="runs")
