"""What was done to runs from outside their own process (the `actions` table, migration 3):
the dashboard's launch, stop, resume, checkpoint cleanup, eval, export and serve, each with
when, what and the command line it ran (or the signal it sent). A run's own progress stays in
its row of the runs table; this is the log a person reads to learn who stopped a run and when.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from largeforge.runs.database import Database, format_time, now


@dataclass(frozen=True)
class ActionRecord:
    """One action: `run_dir` is the run's key (its resolved path) or None for one on a model
    that is not a run; `origin` says where it came from (`dashboard`)."""

    action: str
    run_dir: str | None = None
    detail: str | None = None
    origin: str = "dashboard"
    time: float = 0.0
    id: int | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["time"] = format_time(self.time)
        return data


class ActionsMixin(Database):
    """The action methods of `Registry`: append and list."""

    def record_action(self, record: ActionRecord) -> ActionRecord:
        record = dataclasses.replace(record, time=now())
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT INTO actions (time, run_dir, action, detail, origin) "
                "VALUES (?, ?, ?, ?, ?)",
                (record.time, record.run_dir, record.action, record.detail, record.origin),
            )
        return dataclasses.replace(record, id=cursor.lastrowid)

    def list_actions(self, run_dir: str | None = None, limit: int = 100) -> list[ActionRecord]:
        """The newest first; only those of `run_dir` (a run key) when given."""
        if not self._exists():
            return []
        query, args = "SELECT * FROM actions", ()  # type: tuple[Any, ...]
        if run_dir is not None:
            query, args = query + " WHERE run_dir = ?", (run_dir,)
        with self._connect() as conn:
            rows = conn.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [ActionRecord(action=r["action"], run_dir=r["run_dir"], detail=r["detail"],
                             origin=r["origin"], time=r["time"], id=r["id"]) for r in rows]
