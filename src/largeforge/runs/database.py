"""The registry's SQLite file, shared by every process on the machine: where it is, how it is
opened, written and migrated. The tables themselves are in `registry.py` (runs, and the list of
migrations) and `experts.py` (the router's experts).

Where: the `path` argument, else `$LARGEFORGE_REGISTRY`, else `~/.largeforge/registry.db`
(parent directories are created). The database runs in WAL mode with a busy timeout
(`$LARGEFORGE_REGISTRY_TIMEOUT` seconds, default 10), every write is one short statement or
one `BEGIN IMMEDIATE` transaction, and every operation opens and closes its own connection, so
several training runs can write at once without "database is locked".

The schema is versioned: `schema_version` lists the migrations applied, and the subclass's
`migrations` are applied in order on open. A later feature adds a table by appending a
migration, never by editing an old one.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from largeforge.errors import LargeForgeError

ENV_PATH = "LARGEFORGE_REGISTRY"
ENV_TIMEOUT = "LARGEFORGE_REGISTRY_TIMEOUT"
DEFAULT_TIMEOUT = 10.0


def default_registry_path() -> Path:
    env = os.environ.get(ENV_PATH)
    return Path(env).expanduser() if env else Path.home() / ".largeforge" / "registry.db"


def now() -> float:
    """The time stored in the registry: seconds since the epoch."""
    return time.time()


def format_time(epoch: float | None) -> str:
    """A stored time as people read it (local time); "" for none."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else ""


class Database:
    """The SQLite file at `path` (see the module docstring for the default).

    With `create=False` (what commands that only read use) a database that does not exist yet
    is not created: it reads as empty until something writes to it. Subclasses say which
    `migrations` bring the schema up to date.
    """

    def __init__(self, path: str | Path | None = None, timeout: float | None = None, *,
                 create: bool = True, lazy: bool = False) -> None:
        self.path = Path(path).expanduser() if path is not None else default_registry_path()
        if timeout is None:
            timeout = _env_timeout()
        self.timeout = timeout
        if self.path.is_dir():
            raise LargeForgeError(
                f"runs registry {self.path} is a directory; give the path of a database file "
                f"(--registry or ${ENV_PATH})"
            )
        self._ready = False
        # lazy: opened by the first read or write, which report a damaged file then (a
        # long-running reader such as the dashboard starts whatever state the file is in).
        if not lazy and (create or self.path.exists()):
            self._open()

    @property
    def migrations(self) -> tuple[str, ...]:
        """Append-only: migration i (1-based) brings the schema to version i."""
        raise NotImplementedError

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LargeForgeError(
                f"cannot create the directory of the runs registry {self.path}: {exc}"
            ) from exc
        with self._errors():
            self._setup()
        self._ready = True

    def _exists(self) -> bool:
        """For reads: whether there is a database (opened now if another process made it)."""
        if not self._ready and self.path.is_file():
            self._open()
        return self._ready

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """SQLite's errors (locked beyond the timeout, not a database, read-only) as ours."""
        try:
            yield
        except sqlite3.Error as exc:
            raise LargeForgeError(f"runs registry {self.path}: {exc}") from exc

    # -- connections ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: autocommit; multi-statement writes say BEGIN IMMEDIATE
        # themselves, so a writer takes the write lock first (a deferred transaction that
        # upgrades from read to write fails with "database is locked" without waiting).
        with self._errors():
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            try:
                conn.row_factory = sqlite3.Row
                conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
                yield conn
            finally:
                conn.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if not self._ready:
            self._open()
        with self._transaction() as conn:
            yield conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _setup(self) -> None:
        """WAL mode and the migrations this version knows, applied once under the write lock.
        An up-to-date database is only read, so readers need no write access. Several
        processes may race to create the same new database: switching to WAL can fail with
        SQLITE_BUSY without the busy handler being asked, so that one step is retried until
        the timeout."""
        migrations = self.migrations
        if self._version() >= len(migrations):
            return
        deadline = time.monotonic() + self.timeout
        while True:
            with self._connect() as conn:
                try:
                    conn.execute("PRAGMA journal_mode = WAL")
                    break
                except sqlite3.OperationalError as exc:
                    if not _is_busy(exc) or time.monotonic() > deadline:
                        raise
            time.sleep(0.01)
        with self._transaction() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, applied REAL NOT NULL)"
            )
            current = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
            for version, script in enumerate(migrations, start=1):
                if version <= current:
                    continue
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO schema_version VALUES (?, ?)", (version, now()))

    def _version(self) -> int:
        with self._connect() as conn:
            try:
                row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return 0
                raise
        return int(row[0] or 0)

    def schema_version(self) -> int:
        """The number of migrations applied (later LargeForge versions may have applied more)."""
        return self._version() if self._exists() else 0


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _env_timeout() -> float:
    raw = os.environ.get(ENV_TIMEOUT)
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise LargeForgeError(f"${ENV_TIMEOUT} must be a number of seconds, not {raw!r}") from None
    if value < 0:
        raise LargeForgeError(f"${ENV_TIMEOUT} must be 0 or more seconds, not {raw!r}")
    return value
