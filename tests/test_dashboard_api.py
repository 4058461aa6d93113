"""The dashboard's app in-process (FastAPI's TestClient, a real registry and real run
directories): the launch form is the CLI's own flags, and the pages survive a registry that is
locked, damaged or missing, a run deleted under them and a run directory half written."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from largeforge.cli.main import app as cli_app
from largeforge.dashboard.app import create_app
from largeforge.dashboard.control import Dashboard
from largeforge.dashboard.launch_form import COMMANDS, form_fields
from largeforge.runs import Registry, RunRecord


def _client(tmp_path: Path, registry: Path | None = None) -> TestClient:
    dashboard = Dashboard.create(registry or tmp_path / "registry.db", tmp_path / "runs",
                                 tmp_path / "state")
    return TestClient(create_app(dashboard))


def _cli_options(words: tuple[str, ...]) -> set[str]:
    import typer.main

    command = typer.main.get_command(cli_app)
    for word in words:
        command = command.commands[word]  # type: ignore[attr-defined]
    return {opt for p in command.params for opt in p.opts}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_form_is_the_commands_own_flags(command):
    words, _ = COMMANDS[command]
    options = _cli_options(words)
    fields = form_fields(command)
    for f in fields:
        assert f.option in options, (command, f.option)  # every field is a real option
    shown = {f.option for f in fields}
    # every recipe flag of the command is on the form (the run's place is its name field)
    from largeforge.cli.recipe_options import option_name

    flags = {option_name(n) for n in COMMANDS[command][1] if n not in ("name", "output_dir")}
    assert flags <= shown and flags <= options
    assert all(f.help for f in fields)


def _run(root: Path, name: str, state: dict | None, metrics: str = "") -> Path:
    run = root / "runs" / name
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text("model:\n  preset: tiny\ntrain:\n  max_steps: 10\n")
    if state is not None:
        (run / "run.json").write_text(json.dumps(state))
    if metrics:
        (run / "metrics.jsonl").write_text(metrics)
    return run


def test_a_missing_registry_lists_the_runs_on_disk(tmp_path):
    _run(tmp_path, "ondisk", {"status": "completed", "step": 10, "max_steps": 10})
    client = _client(tmp_path)
    rows = client.get("/api/runs").json()["runs"]
    assert [(r["name"], r["status"]) for r in rows] == [("ondisk", "completed")]
    page = client.get("/")
    assert page.status_code == 200 and "ondisk" in page.text
    assert not (tmp_path / "registry.db").exists()  # reading never creates it


def test_a_locked_or_damaged_registry_is_a_notice_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LARGEFORGE_REGISTRY_TIMEOUT", "0.5")
    registry = tmp_path / "registry.db"
    run = _run(tmp_path, "locked", {"status": "completed"})
    Registry(registry).record_run(RunRecord(run_dir=str(run), name="locked",
                                            status="completed"))
    holder = sqlite3.connect(registry, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        # Held by a writer: the registry's WAL lets readers on, and an action whose entry
        # cannot be written still happens (its log entry is what is lost).
        client = _client(tmp_path, registry)
        body = client.get("/api/runs").json()
        assert [(r["name"], r["status"]) for r in body["runs"]] == [("locked", "completed")]
        page = client.get(f"/run?dir={run}")
        assert page.status_code == 200 and "locked" in page.text
        cleanup = client.post("/api/run/cleanup", json={"dir": str(run)})
        assert cleanup.status_code == 200 and "freed 0 B" in cleanup.json()["message"]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # Damaged while the dashboard runs.
    registry.write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        Path(str(registry) + suffix).unlink(missing_ok=True)
    body = client.get("/api/runs").json()
    assert "cannot be read" in body["notice"] and [r["name"] for r in body["runs"]] == ["locked"]
    # and a dashboard started on the damaged file shows the same
    body = _client(tmp_path, registry).get("/api/runs").json()
    assert "cannot be read" in body["notice"] and [r["name"] for r in body["runs"]] == ["locked"]
    assert _client(tmp_path, registry).get("/").status_code == 200


def test_a_run_deleted_under_the_dashboard_is_missing(tmp_path):
    import shutil

    registry = tmp_path / "registry.db"
    run = _run(tmp_path, "gone", {"status": "completed"})
    Registry(registry).record_run(RunRecord(run_dir=str(run), name="gone", status="completed"))
    client = _client(tmp_path, registry)
    shutil.rmtree(run)
    rows = client.get("/api/runs").json()["runs"]
    assert [(r["name"], r["status"]) for r in rows] == [("gone", "missing")]
    assert client.get(f"/run?dir={run}").status_code == 200
    events = client.get("/api/run/metrics", params={"dir": str(run)}).text
    assert "event: end" in events and '"missing"' in events


def test_a_half_written_run_shows_what_can_be_read(tmp_path):
    metrics = ('{"step": 5, "loss": 3.5, "lr": 0.001, "tokens": 100}\n'
               '{"step": 5, "val_loss": NaN}\n'
               '{"step": 10, "loss": 3.1, "lr": 0.0')  # torn: the writer is mid-line
    run = _run(tmp_path, "half", None, metrics)
    (run / "run.json").write_text('{"status": "runn')  # damaged
    client = _client(tmp_path)
    page = client.get(f"/run?dir={run}")
    assert page.status_code == 200 and "is not valid JSON" in page.text
    # Its status is unknown (no readable run.json, no registry row), so the stream stays open
    # for what the run may still write: read its first event only.
    with client.stream("GET", "/api/run/metrics", params={"dir": str(run)}) as response:
        lines = response.iter_lines()
        assert next(lines) == "event: records"
        records = json.loads(next(lines).removeprefix("data: "))
    assert [r["step"] for r in records] == [5, 5]  # the torn line is not read yet
    assert records[1]["val_loss"] is None  # NaN is not JSON: sent as null
    assert client.get("/api/runs").json()["runs"][0]["name"] == "half"
    compare = client.get("/api/compare", params=[("dir", str(run)), ("dir", str(run))])
    assert compare.status_code == 200


def test_actions_on_a_run_that_cannot_take_them_are_refused(tmp_path):
    run = _run(tmp_path, "done", {"status": "completed"})
    client = _client(tmp_path)
    stop = client.post("/api/run/stop", json={"dir": str(run)})
    assert stop.status_code == 400 and "not running" in stop.json()["error"]
    resume = client.post("/api/run/resume", json={"dir": str(run)})
    assert resume.status_code == 400 and "no checkpoint" in resume.json()["error"]
    assert client.get("/api/jobs").json() == []


def test_form_errors_start_nothing(tmp_path):
    client = _client(tmp_path)
    bad = client.post("/api/launch", json={"command": "train", "values": {
        "data": "x.txt", "max_steps": "-3", "run_name": "../escape"}})
    assert bad.status_code == 422
    errors = bad.json()["errors"]
    assert "run_name" in errors
    sets = client.post("/api/launch", json={"command": "train", "values": {
        "data": "x.txt", "run_name": "ok", "set": "train.lr"}})
    assert "section.key=value" in sets.json()["errors"]["set"]
    lr = client.post("/api/launch", json={"command": "sft", "values": {
        "model": "m", "data": "x.txt", "run_name": "ok", "lr": "-1"}})
    assert "--lr" in lr.json()["errors"]["lr"]
    assert not (tmp_path / "runs").exists() and client.get("/api/jobs").json() == []


def test_router_state_of_an_address_with_no_router_is_a_clear_error(tmp_path):
    import socket

    client = _client(tmp_path)
    bad = client.get("/api/router", params={"url": "ftp://example"})
    assert bad.status_code == 400 and "http://" in bad.json()["error"]
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nobody = client.get("/api/router", params={"url": f"http://127.0.0.1:{port}"})
    assert nobody.status_code == 400 and "no router answers" in nobody.json()["error"]
