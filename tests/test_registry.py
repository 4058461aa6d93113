"""The runs registry (SQLite) and `largeforge runs list | show | logs [--follow]`: real training
runs recorded as completed, failed or dead; several processes writing at once; a registry that
cannot be written never breaks training."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from rich.console import Console

from conftest import SHARED_DATA, checkpoint_reached, kill_cli_when, run_cli
from largeforge.config import load_recipe
from largeforge.errors import LargeForgeError
from largeforge.runs import Registry, RunRecord, RunRecorder
from largeforge.runs import registry as registry_module


def recipe_dict(data: Path, out: Path, name: str, **train: object) -> dict:
    return {
        "model": {"preset": "tiny", "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                  "hidden_dim": 128, "max_seq_len": 64},
        "tokenizer": {"vocab_size": 300},
        "data": {"train": [str(data)], "seq_len": 32, "split": "tail"},
        "train": {"batch_size": 8, "max_steps": 12, "lr": 3e-3, "warmup_steps": 2,
                  "eval_every": 4, "eval_batches": 2, "log_every": 2, "threads": 1, **train},
        "output": {"dir": str(out), "name": name},
    }


def write_recipe(path: Path, data: Path, out: Path, name: str, **train: object) -> Path:
    path.write_text(yaml.safe_dump(recipe_dict(data, out, name, **train)), encoding="utf-8")
    return path


def write_corpus(directory: Path) -> Path:
    path = directory / "corpus.txt"
    text = (SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:50_000]
    path.write_text(text, encoding="utf-8")
    return path


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def corpus(tmp_path, shared_data) -> Path:
    return write_corpus(tmp_path)


@pytest.fixture
def registry_path(tmp_path, monkeypatch) -> Path:
    """A registry of this test's own (the session's is shared by every test)."""
    path = tmp_path / "registry.db"
    monkeypatch.setenv("LARGEFORGE_REGISTRY", str(path))
    return path


@pytest.fixture(scope="module")
def completed(tmp_path_factory) -> SimpleNamespace:
    """One real training run, recorded in a registry of its own. In this process: the CLI's
    own training is what the SIGKILL and --follow tests run. Module-scoped fixtures run before
    the autouse environment fixture, so the environment is set here."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    from largeforge.training.loop import train

    root = tmp_path_factory.mktemp("completed")
    env = {"LARGEFORGE_REGISTRY": str(root / "registry.db"),
           "LARGEFORGE_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "largeforge-cache")}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        recipe = recipe_dict(write_corpus(root), root / "runs", "done")
        train(load_recipe(recipe, environ={}), console=Console(file=io.StringIO()))
    return SimpleNamespace(run=root / "runs" / "done", registry=root / "registry.db", env=env,
                           root=root)


def test_a_finished_run_is_recorded_as_completed_with_hash_best_metric_and_paths(completed):
    run = completed.run.resolve()
    record = Registry(completed.registry).get_run("done")
    assert record.run_dir == str(run) and record.name == "done"
    assert record.status == record.shown_status == "completed" and record.error is None
    recipe_bytes = (run / "recipe.yaml").read_bytes()
    assert record.recipe_hash == hashlib.sha256(recipe_bytes).hexdigest()
    assert (record.objective, record.method, record.model_source) == ("lm", "pretrain",
                                                                      "preset:tiny")
    assert (record.step, record.max_steps) == (12, 12)
    evals = [r for r in metrics(run) if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    assert record.best_metric == "val_loss"
    assert record.best_value == best["val_loss"] and record.best_step == best["step"]
    assert record.best_dir == str(run / "best") and record.final_dir == str(run / "final")
    assert record.latest_checkpoint == str(run / "checkpoints" / "step-12")
    assert record.hostname == socket.gethostname() and record.pid == os.getpid()
    assert 0 < record.created <= record.updated
    # The same row by path, and run.json tells the same pid.
    assert Registry(completed.registry).get_run(run) == record
    assert json.loads((run / "run.json").read_text())["pid"] == record.pid


def test_runs_list_show_and_logs(completed):
    env, run = completed.env, completed.run.resolve()
    listed = run_cli("runs", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if " done " in line)
    for text in ("completed", "12/12", "val_loss", str(run)):
        assert text in row, listed.stdout
    as_json = json.loads(run_cli("runs", "list", "--json", env=env).stdout)
    assert [r["name"] for r in as_json] == ["done"] and as_json[0]["shown_status"] == "completed"
    assert "no runs" in run_cli("runs", "list", "--status", "failed", env=env).stdout
    assert " done " in run_cli("runs", "list", "--status", "completed", env=env).stdout

    shown = run_cli("runs", "show", "done", env=env)
    assert shown.returncode == 0, shown.stderr
    record = Registry(completed.registry).get_run("done")
    for text in (record.recipe_hash, "preset:tiny", "pretrain", "12/12", "last train",
                 "last eval", str(run / "final"), "step-12", f"pid {record.pid}"):
        assert text in shown.stdout, (text, shown.stdout)
    details = json.loads(run_cli("runs", "show", str(run), "--json", env=env).stdout)
    assert details["status"] == "completed" and details["registry"]["name"] == "done"
    assert details["run_json"]["step"] == 12
    assert details["last_metrics"]["eval"] == [r for r in metrics(run) if "val_loss" in r][-1]

    logs = run_cli("runs", "logs", "done", env=env)
    assert logs.returncode == 0, logs.stderr
    lines = logs.stdout.splitlines()
    records = metrics(run)
    assert len(lines) == len(records)
    for line, record in zip(lines, records, strict=True):
        assert line.split()[:3] == ["step", str(record["step"]),
                                    "eval" if "val_loss" in record else "train"]
        key = "val_loss" if "val_loss" in record else "loss"
        assert f"{key} {record[key]:.4f}" in line


def test_a_run_directory_not_in_the_registry_is_shown_from_its_files(completed, tmp_path):
    other = tmp_path / "empty-registry.db"
    shown = run_cli("runs", "show", str(completed.run), "--registry", str(other),
                    env=completed.env)
    assert shown.returncode == 0, shown.stderr
    assert "not in the registry" in shown.stdout and "completed" in shown.stdout
    assert "12/12" in shown.stdout and "last eval" in shown.stdout
    logs = run_cli("runs", "logs", str(completed.run), "--registry", str(other),
                   env=completed.env)
    assert len(logs.stdout.splitlines()) == len(metrics(completed.run))
    assert not other.exists(), "reading must not create a registry"


def test_a_diverging_run_is_failed_and_a_restart_with_overwrite_replaces_its_row(
        corpus, tmp_path, registry_path):
    recipe = recipe_dict(corpus, tmp_path / "runs", "diverge", lr=1e6, grad_clip=0.0,
                         log_every=1, max_steps=8, save_every=2)
    with pytest.raises(LargeForgeError, match="diverged"):
        from largeforge.training.loop import train

        train(load_recipe(recipe, environ={}), console=Console(file=io.StringIO()))
    run = (tmp_path / "runs" / "diverge").resolve()
    failed = Registry().get_run("diverge")
    assert failed.status == failed.shown_status == "failed"
    assert "training diverged at step" in failed.error
    assert failed.latest_checkpoint == str(run / "checkpoints" / "step-2")
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "failed" and "diverged" in state["error"]
    listed = run_cli("runs", "list", "--status", "failed")
    assert " diverge " in listed.stdout and "failed" in listed.stdout
    assert "training diverged" in run_cli("runs", "show", "diverge").stdout

    # Started over: a new row (new created time), no error left.
    recipe["train"].update(lr=3e-3, grad_clip=1.0, max_steps=4)
    train(load_recipe(recipe, environ={}), overwrite=True, console=Console(file=io.StringIO()))
    again = Registry().get_run("diverge")
    assert again.status == "completed" and again.error is None and again.step == 4
    assert again.created > failed.created
    assert json.loads((run / "run.json").read_text()).get("error") is None
    assert len(Registry().list_runs()) == 1


def test_a_sigkilled_run_shows_as_dead(corpus, tmp_path, registry_path):
    recipe = write_recipe(tmp_path / "r.yaml", corpus, tmp_path / "runs", "killed",
                          max_steps=400, save_every=2, log_every=1)
    run = tmp_path / "runs" / "killed"
    kill_cli_when(["train", "--config", str(recipe)], checkpoint_reached(run, 2))
    record = Registry().get_run("killed")
    assert record.status == "running" and record.shown_status == "dead"
    assert " killed " in run_cli("runs", "list", "--status", "dead").stdout
    assert "no runs" in run_cli("runs", "list", "--status", "running").stdout
    listed = json.loads(run_cli("runs", "list", "--json").stdout)
    assert listed[0]["status"] == "running" and listed[0]["shown_status"] == "dead"
    assert "dead" in run_cli("runs", "show", "killed").stdout
    # Following a dead run prints what it logged and returns at once.
    followed = run_cli("runs", "logs", "killed", "--follow", timeout=30)
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout.splitlines()[-1] == "run killed is dead"
    assert len(followed.stdout.splitlines()) == len(metrics(run)) + 1


def test_logs_follow_follows_a_training_process_to_its_end(corpus, tmp_path, registry_path):
    recipe = write_recipe(tmp_path / "r.yaml", corpus, tmp_path / "runs", "live",
                          max_steps=40, log_every=1, eval_every=20, save_every=20)
    run = tmp_path / "runs" / "live"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    trainer = subprocess.Popen([sys.executable, "-m", "largeforge.cli.main", "train",
                                "--config", str(recipe)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    follower = None
    try:
        deadline = time.time() + 300
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size):
            assert trainer.poll() is None, trainer.stderr.read().decode()
            assert time.time() < deadline
            time.sleep(0.01)
        # Paused (not ended) while the follower starts: the run is surely still going while
        # the follower prints, however loaded this machine is.
        trainer.send_signal(signal.SIGSTOP)
        follower = subprocess.Popen(
            [sys.executable, "-m", "largeforge.cli.main", "runs", "logs", "live", "--follow",
             "--interval", "0.1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        guard = threading.Timer(180, follower.kill)  # a follower that never leaves fails
        guard.start()
        first = follower.stdout.readline()
        assert first.startswith("step      1  train  loss"), first
        time.sleep(0.5)
        assert follower.poll() is None, "the follower left a run that is still going"
        trainer.send_signal(signal.SIGCONT)
        assert trainer.wait(timeout=300) == 0, trainer.stderr.read().decode()
        rest = follower.stdout.read()  # to its end: the follower leaves once the run is over
        assert follower.wait(timeout=60) == 0, follower.stderr.read()
        guard.cancel()
    finally:
        for proc in (trainer, follower):
            if proc is not None and proc.poll() is None:
                proc.kill()
    lines = [first.rstrip("\n"), *rest.splitlines()]
    assert lines[-1] == "run live is completed"
    records = metrics(run)
    assert len(records) == 40 + 2
    assert len(lines) == len(records) + 1
    assert [line.split()[1] for line in lines[:-1]] == [str(r["step"]) for r in records]


def test_ctrl_c_leaves_logs_follow_with_exit_code_0(tmp_path, registry_path):
    """A run that goes on forever: its row names this (live) test process."""
    run = tmp_path / "forever"
    run.mkdir()
    (run / "recipe.yaml").write_text("{}\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.5}) + "\n")
    Registry().record_run(RunRecord(run_dir=str(run), name="forever", pid=os.getpid(),
                                    hostname=socket.gethostname()))
    follower = subprocess.Popen(
        [sys.executable, "-m", "largeforge.cli.main", "runs", "logs", "forever", "--follow",
         "--interval", "0.05"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A shell without job control starts background commands with SIGINT ignored, and a
        # Python started so never gets KeyboardInterrupt: give the follower Ctrl-C back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    guard = threading.Timer(60, follower.kill)  # a follower that never leaves fails
    guard.start()
    assert follower.stdout.readline().startswith("step      1  train  loss 2.5000")
    time.sleep(0.3)
    assert follower.poll() is None, "--follow stopped following a running run"
    follower.send_signal(signal.SIGINT)
    _, err = follower.communicate(timeout=30)
    guard.cancel()
    assert follower.returncode == 0 and "Traceback" not in err, err


def test_several_processes_writing_at_once_lose_nothing(tmp_path):
    path = tmp_path / "fresh" / "registry.db"  # created by the racing writers themselves
    go = tmp_path / "go"
    script = f"""
import os, sys, time
from pathlib import Path
from largeforge.runs import Registry, RunRecord
i = int(sys.argv[1])
while not Path({str(go)!r}).exists():
    time.sleep(0.001)
own = f"/runs/p{{i}}/own"
Registry({str(path)!r}).record_run(RunRecord(run_dir=own, name=f"own-{{i}}", pid=os.getpid()))
for j in range(50):
    run = RunRecord(run_dir=f"/runs/p{{i}}/r{{j}}", name=f"p{{i}}-{{j}}")
    Registry({str(path)!r}).record_run(run)
    Registry({str(path)!r}).update_run(own, step=j)
"""
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stderr=subprocess.PIPE,
                              text=True) for i in range(4)]
    time.sleep(0.5)  # all four are importing, then wait for the same moment
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "locked" not in err, err
    registry = Registry(path)
    runs = registry.list_runs()
    assert len(runs) == 4 * 51
    assert {r.name for r in runs} == ({f"p{i}-{j}" for i in range(4) for j in range(50)}
                                      | {f"own-{i}" for i in range(4)})
    assert all(registry.get_run(f"own-{i}").step == 49 for i in range(4))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_registry_that_cannot_be_written_never_breaks_training(corpus, tmp_path, monkeypatch):
    garbage = tmp_path / "registry.db"
    garbage.write_bytes(b"this is not a SQLite database\n" * 100)
    monkeypatch.setenv("LARGEFORGE_REGISTRY", str(garbage))
    from largeforge.training.loop import train

    out = io.StringIO()
    result = train(load_recipe(recipe_dict(corpus, tmp_path / "runs", "ok", max_steps=4,
                                           save_every=2), environ={}),
                   console=Console(file=out, width=300))
    assert result.steps == 4 and (tmp_path / "runs" / "ok" / "final").is_dir()
    assert out.getvalue().count("warning") == 1, out.getvalue()
    assert f"the runs registry {garbage} cannot be written" in out.getvalue()
    assert garbage.read_bytes() == b"this is not a SQLite database\n" * 100


def test_a_locked_registry_warns_once_and_the_final_status_catches_up(tmp_path, monkeypatch):
    path = tmp_path / "registry.db"
    Registry(path)
    monkeypatch.setenv("LARGEFORGE_REGISTRY_TIMEOUT", "0.2")
    recipe = load_recipe(recipe_dict(tmp_path / "data.txt", tmp_path / "runs", "held"),
                         environ={}).recipe
    run = tmp_path / "runs" / "held"
    run.mkdir(parents=True)
    out = io.StringIO()
    recorder = RunRecorder(Console(file=out, width=300), path=path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the write lock for long
    try:
        started = time.monotonic()
        recorder.start(run, recipe, resumed=False)
        recorder.checkpoint(run, 4, 3.5, 4)
        recorder.finish(run, "completed", 12, 3.2, 8)
        assert time.monotonic() - started < 5
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert out.getvalue().count("warning") == 1 and "locked" in out.getvalue()
    assert Registry(path).list_runs() == []
    recorder.finish(run, "completed", 12, 3.2, 8)  # the lock is gone: the row is written whole
    record = Registry(path).get_run("held")
    assert (record.status, record.step, record.best_value, record.best_step) == (
        "completed", 12, 3.2, 8)
    assert record.recipe_hash == hashlib.sha256(recipe.to_yaml().encode()).hexdigest()


def test_rows_by_name_or_path_replace_and_remove(tmp_path):
    registry = Registry(tmp_path / "r.db")
    first = registry.record_run(RunRecord(run_dir=str(tmp_path / "a" / "run"), name="run"))
    time.sleep(0.01)
    again = registry.record_run(RunRecord(run_dir=str(tmp_path / "a" / "run"), name="run",
                                          step=3))
    assert again.created == first.created and again.updated > first.updated and again.step == 3
    replaced = registry.record_run(RunRecord(run_dir=str(tmp_path / "a" / "run"), name="run"),
                                   replace=True)
    assert replaced.created > first.created and replaced.step is None
    registry.record_run(RunRecord(run_dir=str(tmp_path / "b" / "run"), name="run"))
    with pytest.raises(LargeForgeError, match="ambiguous") as info:
        registry.get_run("run")
    assert str(tmp_path / "a" / "run") in str(info.value)
    assert registry.get_run(tmp_path / "b" / "run").run_dir == str(tmp_path / "b" / "run")
    assert registry.update_run(tmp_path / "b" / "run", status="failed", error="x").error == "x"
    assert [r.name for r in registry.list_runs(status="failed")] == ["run"]
    assert len(registry.list_runs(limit=1)) == 1
    registry.remove_run(tmp_path / "a" / "run")
    assert registry.get_run("run").run_dir == str(tmp_path / "b" / "run")
    with pytest.raises(LargeForgeError, match="unknown run status"):
        registry.update_run("run", status="exploded")
    with pytest.raises(LargeForgeError, match="cannot update"):
        registry.update_run("run", colour="blue")
    with pytest.raises(LargeForgeError, match="no run 'gone'"):
        registry.get_run("gone")


def test_the_schema_is_versioned_and_a_later_migration_is_applied_once(tmp_path, monkeypatch):
    path = tmp_path / "registry.db"
    registry = Registry(path)
    n = len(registry_module.MIGRATIONS)
    assert registry.schema_version() == n >= 2  # 1: runs, 2: experts (issue 8)
    registry.record_run(RunRecord(run_dir="/r/a", name="a"))
    # A later version adds a table by appending a migration.
    monkeypatch.setattr(registry_module, "MIGRATIONS",
                        (*registry_module.MIGRATIONS, "CREATE TABLE later_feature (name TEXT)"))
    upgraded = Registry(path)
    assert upgraded.schema_version() == n + 1 and upgraded.get_run("a").name == "a"
    assert Registry(path).schema_version() == n + 1  # not applied twice (it would fail)
    with sqlite3.connect(path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"runs", "experts", "later_feature", "schema_version"} <= tables


def test_runs_errors_exit_2_and_write_nothing(tmp_path, registry_path):
    assert "no runs" in run_cli("runs", "list").stdout
    assert not registry_path.exists(), "listing must not create the registry"
    assert "unknown run 'nope'" in error_line(run_cli("runs", "show", "nope"))
    assert "unknown run 'nope'" in error_line(run_cli("runs", "logs", "nope", "--follow"))
    not_a_run = tmp_path / "plain"
    not_a_run.mkdir()
    assert "not a run directory" in error_line(run_cli("runs", "show", str(not_a_run)))
    as_dir = tmp_path / "registry-dir"
    as_dir.mkdir()
    assert "is a directory" in error_line(run_cli("runs", "list", "--registry", str(as_dir)))
    assert list(as_dir.iterdir()) == []
    assert "unknown status 'bogus'" in error_line(run_cli("runs", "list", "--status", "bogus"))
    assert "limit must be 0 or more" in error_line(run_cli("runs", "list", "--limit", "-1"))
    assert "--interval must be above 0" in error_line(
        run_cli("runs", "logs", str(not_a_run), "--interval", "0"))
    assert "LARGEFORGE_REGISTRY_TIMEOUT" in error_line(
        run_cli("runs", "list", env={"LARGEFORGE_REGISTRY_TIMEOUT": "soon"}))
    not_sqlite = tmp_path / "plain.db"
    not_sqlite.write_text("not sqlite\n" * 100)
    assert "not a database" in error_line(
        run_cli("runs", "list", env={"LARGEFORGE_REGISTRY": str(not_sqlite)}))
    assert not_sqlite.read_text() == "not sqlite\n" * 100
    assert not registry_path.exists()
    # Two runs of one name: the error names both.
    for parent in ("x", "y"):
        (tmp_path / parent / "twin").mkdir(parents=True)
        (tmp_path / parent / "twin" / "recipe.yaml").write_text("{}\n")
        Registry().record_run(RunRecord(run_dir=str(tmp_path / parent / "twin"), name="twin"))
    line = error_line(run_cli("runs", "show", "twin"))
    assert "ambiguous" in line and str(tmp_path / "x" / "twin") in line
    assert str(tmp_path / "y" / "twin") in line
