"""Reading a run from its files: `run.json`, `metrics.jsonl` (also while it grows) and whether
the run is still going. Used by `largeforge runs show` and `largeforge runs logs [--follow]`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from largeforge.runs.registry import RunRecord, process_alive
from largeforge.runs.run_dir import RunDir, RunStateError


def live_status(run_dir: Path, record: RunRecord | None = None) -> str:
    """running, completed, stopped_early, failed, dead (marked running, its process gone) or
    unknown. `run.json` is written by the run itself, so it decides over the registry row
    (which a run goes on without when the registry cannot be written); a damaged `run.json`
    does not stop `runs logs --follow`, the row decides then."""
    try:
        state = RunDir(run_dir).read_state()
    except RunStateError:  # damaged: the registry row is the next best witness
        state = {}
    status = state.get("status") or (record.status if record else None)
    pid = state.get("pid") or (record.pid if record else None)
    host = state.get("hostname") or (record.hostname if record else None)
    if status == "running" and not process_alive(pid, host):
        return "dead"
    return str(status or "unknown")


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete record of `metrics.jsonl` (a torn last line is left for later)."""
    tail = MetricsTail(RunDir(run_dir).metrics)
    return list(tail.read_new())


class MetricsTail:
    """Reads the records appended to a JSONL file since the last call.

    Only whole lines count: a line the writer has not finished stays in the buffer. When the
    file is replaced (a resumed run cuts its log back to the checkpoint and replays), reading
    starts over and records already returned are not returned again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None
        self._inode: int | None = None
        self._buffer = b""
        self._seen: set[tuple[Any, bool]] = set()
        self._restarted = False
        self.unreadable = 0  # complete lines that were not JSON objects

    def read_new(self) -> Iterator[dict[str, Any]]:
        try:
            stat = self.path.stat()
        except OSError:
            return
        if self._file is not None and (stat.st_ino != self._inode
                                       or stat.st_size < self._file.tell()):
            self.close()
            self._restarted = True
        if self._file is None:
            try:
                self._file = self.path.open("rb")
            except OSError:
                return
            self._inode = os.fstat(self._file.fileno()).st_ino
            self._buffer = b""
        data = self._file.read()
        if not data:
            return
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                record = None
            if not isinstance(record, dict):
                self.unreadable += 1
                continue
            key = (record.get("step"), is_eval_record(record))
            if self._restarted and key in self._seen:
                continue
            self._seen.add(key)
            yield record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None


def follow_records(
    run_dir: Path, is_running: Callable[[], bool], *, interval: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[dict[str, Any]]:
    """Every record of the run's metrics, then the new ones as they are written, until
    `is_running()` turns false; the records written before that are all returned."""
    tail = MetricsTail(RunDir(run_dir).metrics)
    try:
        while True:
            # Asked before reading: once the run is over, this read sees all it wrote.
            running = is_running()
            yield from tail.read_new()
            if not running:
                return
            sleep(interval)
    finally:
        tail.close()


def is_eval_record(record: dict[str, Any]) -> bool:
    return any(key.startswith("val_") for key in record)


def format_record(record: dict[str, Any]) -> str:
    """One readable line: `step     10  train  loss 4.1234  lr 3.00e-03  tokens/s 1,234 ...`."""
    parts = [f"step {record.get('step', '?'):>6}", "eval " if is_eval_record(record) else "train"]
    for key, value in record.items():
        if key == "step" or value is None:
            continue
        parts.append(f"{_LABELS.get(key, key)} {format_value(key, value)}")
    return "  ".join(parts)


_LABELS = {"tokens_per_s": "tokens/s"}


def format_value(key: str, value: Any) -> str:
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if key == "lr":
            return f"{value:.2e}"
        if key == "mfu":
            return f"{100 * value:.1f}%"
        if key == "tokens_per_s":
            return f"{value:,.0f}"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return json.dumps(value)


def last_records(records: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """The last training record and the last evaluation record."""
    train = [r for r in records if not is_eval_record(r)]
    evals = [r for r in records if is_eval_record(r)]
    return {"train": train[-1] if train else None, "eval": evals[-1] if evals else None}
