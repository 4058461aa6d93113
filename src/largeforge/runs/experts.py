"""The router's experts in the registry (the `experts` table, migration 2), by name.

Kept apart from the runs table because nothing about a run depends on them: `Registry` mixes
these methods in so one registry file (and one `--registry` option) serves both, and
`largeforge.serving.experts` validates what goes in.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from largeforge.errors import LargeForgeError
from largeforge.runs.database import Database, format_time, now


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


class ExpertsMixin(Database):
    """The expert methods of `Registry`: add, list, find, get and remove by name."""

    def add_expert(self, record: ExpertRecord) -> ExpertRecord:
        """Insert an expert; a name already taken is an error. `created` is set to now."""
        record = dataclasses.replace(record, created=now())
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


def _expert(row: sqlite3.Row) -> ExpertRecord:
    return ExpertRecord(
        name=row["name"], model=row["model"], keywords=tuple(json.loads(row["keywords"])),
        urls=tuple(json.loads(row["urls"])), replicas=int(row["replicas"]),
        description=row["description"], created=row["created"],
    )
