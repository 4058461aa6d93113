"""The runs registry: one SQLite row per run, shared by every process on the machine.

The file, its location (`$LARGEFORGE_REGISTRY`, else `~/.largeforge/registry.db`), its locking
and how migrations are applied are `database.py`'s; this module holds the schema (`MIGRATIONS`)
and the runs table. The router's experts share the file (`experts.py`, mixed into `Registry`).

A row is keyed by the run directory's resolved absolute path. The training loop writes through
`RunRecorder` (`recorder.py`), which never raises: a registry that cannot be written (locked
beyond the timeout, a read-only disk, a corrupt file) is reported once on the console and
training goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import socket
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from largeforge.errors import LargeForgeError
from largeforge.runs.actions import ActionsMixin
from largeforge.runs.database import default_registry_path, format_time, now
from largeforge.runs.experts import ExpertsMixin
from largeforge.runs.run_dir import RECIPE_FILE, is_run_dir

# stopped: ended on request (SIGINT) after saving a checkpoint; `--resume` continues it.
STATUSES = ("running", "completed", "stopped_early", "stopped", "failed")
# What `runs list` shows: a `running` row whose process is gone is `dead`.
SHOWN_STATUSES = (*STATUSES, "dead")

# Append-only: migration i (1-based) brings the schema to version i.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE runs (
        run_dir TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        status TEXT NOT NULL,
        error TEXT,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        recipe_hash TEXT,
        objective TEXT,
        method TEXT,
        model_source TEXT,
        step INTEGER,
        max_steps INTEGER,
        best_metric TEXT,
        best_value REAL,
        best_step INTEGER,
        best_dir TEXT,
        final_dir TEXT,
        latest_checkpoint TEXT,
        pid INTEGER,
        hostname TEXT
    );
    CREATE INDEX runs_name ON runs (name);
    CREATE INDEX runs_updated ON runs (updated);
    """,
    # 2: experts the router serves (`largeforge expert add`); keywords and urls are JSON lists.
    """
    CREATE TABLE experts (
        name TEXT PRIMARY KEY,
        model TEXT,
        keywords TEXT NOT NULL,
        urls TEXT NOT NULL,
        replicas INTEGER NOT NULL,
        description TEXT,
        created REAL NOT NULL
    );
    """,
    # 3: actions taken on runs from outside them (the dashboard's stop, resume, cleanup, ...).
    """
    CREATE TABLE actions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time REAL NOT NULL,
        run_dir TEXT,
        action TEXT NOT NULL,
        detail TEXT,
        origin TEXT NOT NULL
    );
    CREATE INDEX actions_run ON actions (run_dir);
    """,
)


def recipe_hash(recipe_yaml: str) -> str:
    """sha256 of the resolved recipe's YAML, as written to the run's recipe.yaml."""
    return hashlib.sha256(recipe_yaml.encode("utf-8")).hexdigest()


def run_key(run_dir: str | Path) -> str:
    """The registry's key of a run: its directory's resolved absolute path, so that the same
    run reached by different paths (relative, through a link) is one row."""
    return str(Path(run_dir).expanduser().resolve())


@dataclass
class RunRecord:
    """One run as the registry holds it. Times are seconds since the epoch."""

    run_dir: str
    name: str
    status: str = "running"
    error: str | None = None
    created: float = 0.0
    updated: float = 0.0
    recipe_hash: str | None = None
    objective: str | None = None
    method: str | None = None
    model_source: str | None = None
    step: int | None = None
    max_steps: int | None = None
    best_metric: str | None = None
    best_value: float | None = None
    best_step: int | None = None
    best_dir: str | None = None
    final_dir: str | None = None
    latest_checkpoint: str | None = None
    pid: int | None = None
    hostname: str | None = None

    @property
    def shown_status(self) -> str:
        """`dead` for a run marked running whose process no longer exists on this host."""
        if self.status == "running" and not process_alive(self.pid, self.hostname):
            return "dead"
        return self.status

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["shown_status"] = self.shown_status
        data["created"] = format_time(self.created)
        data["updated"] = format_time(self.updated)
        return data


_FIELDS = [f.name for f in dataclasses.fields(RunRecord)]


def process_alive(pid: int | None, hostname: str | None) -> bool:
    """Whether `pid` still runs. A process on another host cannot be checked: assumed alive."""
    if pid is None:
        return True
    if hostname and hostname != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    # A killed child nobody has reaped yet is a zombie: it exists but will never run again.
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
    return True


class Registry(ExpertsMixin, ActionsMixin):
    """The runs registry at `path` (see `database.py` for the default and the locking).

    With `create=False` (what commands that only read use) a registry that does not exist yet
    is not created: it reads as empty until something writes to it.
    """

    @property
    def migrations(self) -> tuple[str, ...]:
        # Read at each open, not bound once: a later version (or a test) appends to it.
        return MIGRATIONS

    # -- writes --------------------------------------------------------------------------------

    def record_run(self, record: RunRecord, *, replace: bool = False) -> RunRecord:
        """Insert the run, or update its row. `replace` (a run started over with --overwrite)
        drops the old row first, so `created` is new; otherwise `created` is kept."""
        stamp = now()
        record = dataclasses.replace(
            record, run_dir=run_key(record.run_dir), updated=stamp,
            created=record.created or stamp,
        )
        _check_status(record.status)
        values = dataclasses.asdict(record)
        columns = ", ".join(_FIELDS)
        marks = ", ".join(f":{name}" for name in _FIELDS)
        updates = ", ".join(f"{n} = excluded.{n}" for n in _FIELDS if n not in ("run_dir",
                                                                                   "created"))
        with self._write() as conn:
            if replace:
                conn.execute("DELETE FROM runs WHERE run_dir = ?", (record.run_dir,))
            conn.execute(
                f"INSERT INTO runs ({columns}) VALUES ({marks}) "
                f"ON CONFLICT (run_dir) DO UPDATE SET {updates}",
                values,
            )
            row = conn.execute("SELECT * FROM runs WHERE run_dir = ?", (record.run_dir,))
            return _record(row.fetchone())

    def update_run(self, run: str | Path, **fields: Any) -> RunRecord:
        """Set some fields of one run (a name or a path); `updated` is set to now."""
        unknown = sorted(set(fields) - set(_FIELDS) | ({"run_dir", "created"} & set(fields)))
        if unknown:
            settable = [f for f in _FIELDS if f not in ("run_dir", "created")]
            raise LargeForgeError(f"cannot update {', '.join(unknown)} of a run; fields are "
                                  f"{', '.join(settable)}")
        if "status" in fields:
            _check_status(fields["status"])
        fields["updated"] = now()
        key = self.get_run(run).run_dir
        assignments = ", ".join(f"{name} = :{name}" for name in fields)
        with self._write() as conn:
            conn.execute(f"UPDATE runs SET {assignments} WHERE run_dir = :key",
                         {**fields, "key": key})
            row = conn.execute("SELECT * FROM runs WHERE run_dir = ?", (key,)).fetchone()
        if row is None:  # removed by another process meanwhile
            raise LargeForgeError(f"no run {str(run)!r} in the runs registry {self.path}")
        return _record(row)

    def remove_run(self, run: str | Path) -> RunRecord:
        """Forget a run (its files are left alone); returns the row removed."""
        record = self.get_run(run)
        with self._write() as conn:
            conn.execute("DELETE FROM runs WHERE run_dir = ?", (record.run_dir,))
        return record

    # -- reads ---------------------------------------------------------------------------------

    def list_runs(self, status: str | None = None, limit: int | None = None) -> list[RunRecord]:
        """Runs, most recently updated first. `status` may also be `dead` (a running row whose
        process is gone); `running` then means really running."""
        if status is not None and status not in SHOWN_STATUSES:
            raise LargeForgeError(
                f"unknown status {status!r}; expected one of {', '.join(SHOWN_STATUSES)}"
            )
        if limit is not None and limit < 0:
            raise LargeForgeError(f"limit must be 0 or more, not {limit}")
        if not self._exists():
            return []
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM runs ORDER BY updated DESC, name").fetchall()
        records = [_record(row) for row in rows]
        if status is not None:
            records = [r for r in records if r.shown_status == status]
        return records[:limit] if limit is not None else records

    def find_run(self, run: str | Path) -> RunRecord | None:
        """The run with this path, else with this name; None when there is none. A name that
        several runs share is an error listing them."""
        key = run_key(run)
        if not self._exists():
            return None
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM runs WHERE run_dir = ?", (key,)).fetchone()
            if row is not None:
                return _record(row)
            rows = conn.execute(
                "SELECT * FROM runs WHERE name = ? ORDER BY updated DESC", (str(run),)
            ).fetchall()
        if len(rows) > 1:
            paths = ", ".join(row["run_dir"] for row in rows)
            raise LargeForgeError(
                f"run name {str(run)!r} is ambiguous: {len(rows)} runs have it ({paths}); "
                "give the run's path instead"
            )
        return _record(rows[0]) if rows else None

    def get_run(self, run: str | Path) -> RunRecord:
        record = self.find_run(run)
        if record is None:
            raise LargeForgeError(f"no run {str(run)!r} in the runs registry {self.path}")
        return record


def resolve_run_dir(ref: str | Path, registry: Registry | None = None) -> Path:
    """A run given as a path (any run directory, registered or not) or as a registered name.
    `registry` is opened (default path) only when `ref` is not an existing path."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir() or not is_run_dir(path):
            raise LargeForgeError(f"{path} is not a run directory (no {RECIPE_FILE})")
        return path
    record = (registry or Registry(create=False)).find_run(ref)
    if record is None:
        raise LargeForgeError(
            f"unknown run {str(ref)!r}: no such directory, and no run of that name in the runs "
            f"registry {(registry.path if registry else default_registry_path())}"
        )
    return Path(record.run_dir)


def _record(row: sqlite3.Row) -> RunRecord:
    return RunRecord(**{name: row[name] for name in _FIELDS})


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise LargeForgeError(f"unknown run status {status!r}; expected one of "
                              f"{', '.join(STATUSES)}")
