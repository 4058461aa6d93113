"""Experts in the registry: the migration, CRUD, validation and `largeforge expert ...`."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from conftest import run_cli
from largeforge.errors import LargeForgeError
from largeforge.runs import MIGRATIONS, Registry, RunRecord
from largeforge.serving.experts import add_expert, get_expert, list_experts, remove_expert


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """What the registry checks of a model: a directory with config.json (nothing loads it)."""
    path = tmp_path / "coder"
    path.mkdir()
    (path / "config.json").write_text("{}", encoding="utf-8")
    return path


def test_crud(tmp_path: Path, model_dir: Path) -> None:
    reg = Registry(tmp_path / "reg.db")
    added = add_expert("coding", model=model_dir, keywords="Code, python ,code,,",
                       description="writes code", registry=reg)
    assert added.keywords == ("code", "python")
    assert added.model == str(model_dir.resolve())
    assert added.replicas == 1 and added.urls == () and added.created > 0
    add_expert("general", urls=["http://127.0.0.1:8001/v1/", "http://127.0.0.1:8002"],
               registry=reg)
    assert [e.name for e in list_experts(reg)] == ["coding", "general"]
    general = get_expert("general", reg)
    assert general.urls == ("http://127.0.0.1:8001", "http://127.0.0.1:8002")
    assert general.replicas == 0 and general.model is None
    # Another process sees the same rows.
    assert Registry(tmp_path / "reg.db").get_expert("coding") == added
    assert remove_expert("coding", reg) == added
    assert [e.name for e in list_experts(reg)] == ["general"]
    with pytest.raises(LargeForgeError, match="no expert 'coding'.*experts: general"):
        get_expert("coding", reg)


def test_reading_a_missing_registry_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "none.db"
    assert list_experts(path) == []
    with pytest.raises(LargeForgeError, match="no expert 'x'"):
        remove_expert("x", path)
    assert not path.exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "a b", "urls": ["http://h:1"]}, "expert name 'a b' is not valid"),
        ({"name": "x"}, "needs a model directory"),
        ({"name": "x", "model": "missing/dir/here"}, "not found: no such directory"),
        ({"name": "x", "urls": ["ftp://h:1"]}, "replica URL 'ftp://h:1' is not valid"),
        ({"name": "x", "urls": ["http://h:port"]}, "invalid port"),
        ({"name": "x", "urls": ["http://h:1"], "replicas": 2}, "no model to start them from"),
        ({"name": "x", "urls": ["http://h:1"], "replicas": -1}, "0 or more"),
    ],
)
def test_invalid_experts(tmp_path: Path, kwargs: dict, message: str) -> None:
    path = tmp_path / "reg.db"
    with pytest.raises(LargeForgeError, match=message):
        add_expert(registry=path, **kwargs)
    assert list_experts(path) == []


def test_a_model_that_is_not_a_model_dir(tmp_path: Path) -> None:
    with pytest.raises(LargeForgeError, match="neither a model directory"):
        add_expert("x", model=tmp_path, registry=tmp_path / "reg.db")


def test_migration_keeps_the_runs_of_an_older_registry(tmp_path: Path) -> None:
    """A registry written before experts existed (schema 1) gains the table on open."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0])
    conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied REAL)")
    conn.execute("INSERT INTO schema_version VALUES (1, 0)")
    conn.execute("INSERT INTO runs (run_dir, name, status, created, updated) "
                 "VALUES ('/r/one', 'one', 'completed', 1, 1)")
    conn.commit()
    conn.close()
    reg = Registry(path)
    assert reg.schema_version() == len(MIGRATIONS) >= 2
    assert reg.get_run("/r/one").status == "completed"
    add_expert("g", urls=["http://127.0.0.1:1"], registry=reg)
    reg.record_run(RunRecord(run_dir="/r/two", name="two"))
    assert [e.name for e in reg.list_experts()] == ["g"]
    assert {r.name for r in reg.list_runs()} == {"one", "two"}


# --- the CLI -------------------------------------------------------------------------------


def test_cli_add_list_remove(tmp_path: Path, model_dir: Path) -> None:
    env = {"LARGEFORGE_REGISTRY": str(tmp_path / "reg.db")}
    done = run_cli("expert", "add", "--name", "coding", "--model", str(model_dir),
                   "--keywords", "code,python", "--description", "writes code", env=env)
    assert done.returncode == 0, done.stderr
    assert "added expert coding" in done.stdout and "code, python" in done.stdout
    done = run_cli("expert", "add", "--name", "general", "--url", "http://127.0.0.1:8001",
                   "--url", "http://127.0.0.1:8002", env=env)
    assert done.returncode == 0, done.stderr

    listed = run_cli("expert", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    experts = {e["name"]: e for e in json.loads(listed.stdout)}
    assert experts["coding"]["model"] == str(model_dir.resolve())
    assert experts["coding"]["keywords"] == ["code", "python"]
    assert experts["coding"]["replicas"] == 1
    assert experts["general"]["urls"] == ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    table = run_cli("expert", "list", env=env)
    assert "coding" in table.stdout and "http://127.0.0.1:8002" in table.stdout

    removed = run_cli("expert", "remove", "coding", env=env)
    assert removed.returncode == 0 and "removed expert coding" in removed.stdout
    listed = run_cli("expert", "list", "--json", env=env)
    assert [e["name"] for e in json.loads(listed.stdout)] == ["general"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "--name", "general", "--url", "http://127.0.0.1:9"], "already exists"),
        (["add", "--name", "x", "--model", "no/such/dir"], "'no/such/dir' not found"),
        (["add", "--name", "x"], "needs a model directory"),
        (["add", "--name", "x", "--url", "localhost:80"], "is not valid"),
        (["remove", "nope"], "no expert 'nope'"),
    ],
)
def test_cli_errors(tmp_path: Path, args: list[str], message: str) -> None:
    db = tmp_path / "reg.db"
    add_expert("general", urls=["http://127.0.0.1:8001"], registry=db)
    before = [e.name for e in list_experts(db)]
    done = run_cli("expert", *args, "--registry", str(db))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.startswith("error:") and message in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert [e.name for e in list_experts(db)] == before  # nothing written
    assert get_expert("general", db).urls == ("http://127.0.0.1:8001",)
