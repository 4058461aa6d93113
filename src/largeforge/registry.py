"""The runs registry: one SQLite row per run, shared by every process on the machine.

Where: the `path` argument, else `$LARGEFORGE_REGISTRY`, else `~/.largeforge/registry.db`
(parent directories are created). The database runs in WAL mode with a busy timeout
(`$LARGEFORGE_REGISTRY_TIMEOUT` seconds, default 10), every write is one short statement or
one `BEGIN IMMEDIATE` transaction, and every operation opens and closes its own connection, so
several training runs can write at once without "database is locked".

The schema is versioned: `schema_version` lists the migrations applied, and `MIGRATIONS` is
applied in order on open. A later feature adds a table by appending a migration, never by
editing an old one.

A row is keyed by the run directory's resolved absolute path. The training loop writes through
`RunRecorder`, which never raises: a registry that cannot be written (locked beyond the
timeout, a read-only disk, a corrupt file) is reported once on the console and training goes on.

The `experts` table (migration 2) holds the router's experts by name; `largeforge.serving.experts`
validates what goes in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from largeforge.errors import LargeForgeError

ENV_PATH = "LARGEFORGE_REGISTRY"
ENV_TIMEOUT = "LARGEFORGE_REGISTRY_TIMEOUT"
DEFAULT_TIMEOUT = 10.0
STATUSES = ("running", "completed", "stopped_early", "failed")
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
)


def default_registry_path() -> Path:
    env = os.environ.get(ENV_PATH)
    return Path(env).expanduser() if env else Path.home() / ".largeforge" / "registry.db"


def recipe_hash(recipe_yaml: str) -> str:
    """sha256 of the resolved recipe's YAML, as written to the run's recipe.yaml."""
    return hashlib.sha256(recipe_yaml.encode("utf-8")).hexdigest()


def _now() -> float:
    return time.time()


def format_time(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else ""


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


class Registry:
    """The runs registry at `path` (see the module docstring for the default).

    With `create=False` (what commands that only read use) a registry that does not exist yet
    is not created: it reads as empty until something writes to it.
    """

    def __init__(self, path: str | Path | None = None, timeout: float | None = None, *,
                 create: bool = True) -> None:
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
        if create or self.path.exists():
            self._open()

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
        if self._version() >= len(MIGRATIONS):
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
            for version, script in enumerate(MIGRATIONS, start=1):
                if version <= current:
                    continue
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO schema_version VALUES (?, ?)", (version, _now()))

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

    # -- writes --------------------------------------------------------------------------------

    def record_run(self, record: RunRecord, *, replace: bool = False) -> RunRecord:
        """Insert the run, or update its row. `replace` (a run started over with --overwrite)
        drops the old row first, so `created` is new; otherwise `created` is kept."""
        now = _now()
        record = dataclasses.replace(
            record, run_dir=_key(record.run_dir), updated=now, created=record.created or now
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
        fields["updated"] = _now()
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
        key = _key(run)
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


    # -- experts -------------------------------------------------------------------------------

    def add_expert(self, record: ExpertRecord) -> ExpertRecord:
        """Insert an expert; a name already taken is an error. `created` is set to now."""
        record = dataclasses.replace(record, created=_now())
        with self._write() as conn:
            taken = conn.execute("SELECT 1 FROM experts WHERE name = ?", (record.name,))
            if taken.fetchone() is not None:
                raise LargeForgeError(
                    f"an expert named {record.name!r} already exists in the registry "
                    f"{self.path}; remove it first (largeforge expert remove {record.name})"
                )
            conn.execute(
                "INSERT INTO experts (name, model, keywords, urls, replicas, description, "
                "created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (record.name, record.model, json.dumps(list(record.keywords)),
                 json.dumps(list(record.urls)), record.replicas, record.description,
                 record.created),
            )
        return record

    def list_experts(self) -> list[ExpertRecord]:
        """Every expert, by name."""
        if not self._exists():
            return []
        with self._connect() as conn:
            rows = conn.execute("SELECT * FROM experts ORDER BY name").fetchall()
        return [_expert(row) for row in rows]

    def find_expert(self, name: str) -> ExpertRecord | None:
        if not self._exists():
            return None
        with self._connect() as conn:
            row = conn.execute("SELECT * FROM experts WHERE name = ?", (name,)).fetchone()
        return _expert(row) if row is not None else None

    def get_expert(self, name: str) -> ExpertRecord:
        record = self.find_expert(name)
        if record is None:
            known = ", ".join(e.name for e in self.list_experts()) or "none"
            raise LargeForgeError(
                f"no expert {name!r} in the registry {self.path} (experts: {known})"
            )
        return record

    def remove_expert(self, name: str) -> ExpertRecord:
        """Forget an expert (its model files are left alone); returns the row removed."""
        record = self.get_expert(name)
        with self._write() as conn:
            conn.execute("DELETE FROM experts WHERE name = ?", (name,))
        return record


@dataclass(frozen=True)
class ExpertRecord:
    """One expert of the router: a model the router starts `replicas` servers for, and/or the
    base URLs of servers already running; routed to by `keywords` (lower case)."""

    name: str
    model: str | None = None
    keywords: tuple[str, ...] = ()
    urls: tuple[str, ...] = ()
    replicas: int = 0
    description: str | None = None
    created: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["keywords"], data["urls"] = list(self.keywords), list(self.urls)
        data["created"] = format_time(self.created)
        return data


def _expert(row: sqlite3.Row) -> ExpertRecord:
    return ExpertRecord(
        name=row["name"], model=row["model"], keywords=tuple(json.loads(row["keywords"])),
        urls=tuple(json.loads(row["urls"])), replicas=int(row["replicas"]),
        description=row["description"], created=row["created"],
    )


def resolve_run_dir(ref: str | Path, registry: Registry | None = None) -> Path:
    """A run given as a path (any run directory, registered or not) or as a registered name.
    `registry` is opened (default path) only when `ref` is not an existing path."""
    path = Path(ref).expanduser()
    if path.exists():
        from largeforge.runs import is_run_dir

        if not path.is_dir() or not is_run_dir(path):
            raise LargeForgeError(f"{path} is not a run directory (no recipe.yaml)")
        return path
    record = (registry or Registry(create=False)).find_run(ref)
    if record is None:
        raise LargeForgeError(
            f"unknown run {str(ref)!r}: no such directory, and no run of that name in the runs "
            f"registry {(registry.path if registry else default_registry_path())}"
        )
    return Path(record.run_dir)


class RunRecorder:
    """Keeps one training run's row up to date; never raises.

    Every write is the whole row (an upsert), so after a failed write the next successful one
    brings the row up to date. After the first failure (warned once) progress updates are
    skipped; the final status is still tried.
    """

    def __init__(self, console: Any = None, path: str | Path | None = None) -> None:
        self.console = console
        self.path = path
        self.record: RunRecord | None = None
        self._registry: Registry | None = None
        self._failed = False

    def start(self, run_dir: Path, recipe: Any, *, resumed: bool) -> None:
        """A run starts (fresh, over an old one, or resumed) in its claimed directory."""
        recipe = getattr(recipe, "recipe", recipe)  # a ResolvedRecipe holds the Recipe
        method = recipe.train.method if recipe.model.from_pretrained else "pretrain"
        self.record = RunRecord(
            run_dir=_key(run_dir), name=Path(run_dir).name, status="running",
            recipe_hash=recipe_hash(recipe.to_yaml()), objective=recipe.train.objective,
            method=method,
            model_source=recipe.model.from_pretrained or f"preset:{recipe.model.preset}",
            pid=os.getpid(), hostname=socket.gethostname(),
        )
        if resumed:  # keep what the registry knows (created, best metric) and update it
            previous = self._call(lambda reg: reg.find_run(self.record.run_dir))  # type: ignore
            if previous is not None:
                keep = {k: getattr(previous, k) for k in (
                    "created", "step", "max_steps", "best_metric", "best_value", "best_step",
                    "best_dir", "latest_checkpoint")}
                self.record = dataclasses.replace(self.record, **keep)
        if not self._failed:  # a registry that just failed is not waited on twice
            self._save(replace=not resumed)

    def update(self, **fields: Any) -> None:
        """Progress (a checkpoint was saved): skipped once the registry has failed."""
        if self.record is None:
            return
        self.record = dataclasses.replace(self.record, **fields)
        if not self._failed:
            self._save()

    def checkpoint(self, run_dir: Path, step: int, best_val_loss: float | None,
                   best_step: int | None) -> None:
        from largeforge.runs import latest_checkpoint

        latest = latest_checkpoint(run_dir)
        best = Path(run_dir) / "best"
        self.update(
            step=step, latest_checkpoint=_key(latest) if latest else None,
            best_dir=_key(best) if best.is_dir() else None, **_best(best_val_loss, best_step),
        )

    def finish(self, run_dir: Path, status: str, step: int, best_val_loss: float | None,
               best_step: int | None) -> None:
        if self.record is None:
            return
        from largeforge.runs import latest_checkpoint

        latest = latest_checkpoint(run_dir)
        best, final = Path(run_dir) / "best", Path(run_dir) / "final"
        self.record = dataclasses.replace(
            self.record, status=status, step=step, error=None,
            latest_checkpoint=_key(latest) if latest else None,
            best_dir=_key(best) if best.is_dir() else None,
            final_dir=_key(final) if final.is_dir() else None, **_best(best_val_loss, best_step),
        )
        self._save()

    def fail(self, error: BaseException) -> None:
        """The run raised: marked failed with the message (nothing if it never started)."""
        if self.record is None:
            return
        message = str(error) or type(error).__name__
        if isinstance(error, KeyboardInterrupt):
            message = "interrupted (KeyboardInterrupt)"
        self.record = dataclasses.replace(self.record, status="failed", error=message)
        self._save()

    def _save(self, replace: bool = False) -> None:
        record = self.record
        if record is not None:
            self._call(lambda reg: reg.record_run(record, replace=replace))

    def _call(self, action: Any) -> Any:
        try:
            if self._registry is None:
                self._registry = Registry(self.path)
            return action(self._registry)
        except (sqlite3.Error, OSError, LargeForgeError) as exc:  # never breaks training
            if not self._failed and self.console is not None:
                where = self._registry.path if self._registry else (
                    self.path or default_registry_path())
                self.console.print(
                    f"[yellow]warning[/]: the runs registry {where} cannot be written "
                    f"({type(exc).__name__}: {exc}); training goes on without it"
                )
            self._failed = True
            return None


def _best(best_val_loss: float | None, best_step: int | None) -> dict[str, Any]:
    if best_val_loss is None:
        return {}
    return {"best_metric": "val_loss", "best_value": float(best_val_loss),
            "best_step": best_step}


def _key(run_dir: str | Path) -> str:
    return str(Path(run_dir).expanduser().resolve())


def _record(row: sqlite3.Row) -> RunRecord:
    return RunRecord(**{name: row[name] for name in _FIELDS})


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise LargeForgeError(f"unknown run status {status!r}; expected one of "
                              f"{', '.join(STATUSES)}")


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
