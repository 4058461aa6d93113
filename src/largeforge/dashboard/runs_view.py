"""What the dashboard shows of runs, read from the registry and the run directories alone.

Nothing here raises on a bad run: a registry that is locked or missing becomes a notice and the
runs found under `--runs-dir` are listed instead; a run directory deleted under the dashboard is
`missing`; a damaged `run.json` or a half-written `metrics.jsonl` shows what can be read.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from largeforge.errors import LargeForgeError
from largeforge.runs import (
    Registry,
    RunDir,
    RunRecord,
    RunStateError,
    format_size,
    live_status,
    read_records,
)
from largeforge.runs.cleanup import dir_size
from largeforge.runs.logs import is_eval_record
from largeforge.runs.registry import run_key

EVALS_DIR = "evals"  # <run>/evals/eval-<time>.json: the dashboard's evaluations of the run


@dataclass
class RunsListing:
    rows: list[dict[str, Any]]
    notice: str | None = None  # why the registry could not be read, when it could not


def _registry_records(registry: Registry) -> tuple[list[RunRecord], str | None]:
    try:
        return registry.list_runs(), None
    except (LargeForgeError, sqlite3.Error, OSError) as exc:
        return [], f"the runs registry cannot be read ({exc}); showing the runs found on disk"


def _scan(runs_dir: Path | None) -> list[Path]:
    if runs_dir is None or not runs_dir.is_dir():
        return []
    with contextlib.suppress(OSError):
        return sorted(p for p in runs_dir.iterdir() if p.is_dir() and RunDir(p).is_run())
    return []


def list_runs(registry: Registry, runs_dir: Path | None) -> RunsListing:
    """Every registered run, and any run directory under `runs_dir` the registry lacks."""
    records, notice = _registry_records(registry)
    known = {r.run_dir for r in records}
    for path in _scan(runs_dir):
        if run_key(path) not in known:
            records.append(RunRecord(run_dir=run_key(path), name=path.name, status="unknown",
                                     created=_mtime(path)))
    rows = [run_row(r) for r in records]
    rows.sort(key=lambda row: row["started_ts"] or 0, reverse=True)
    return RunsListing(rows, notice)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _state(run: RunDir) -> tuple[dict[str, Any], str | None]:
    try:
        return run.read_state(), None
    except RunStateError as exc:
        return {}, str(exc)


def run_kind(objective: str | None, method: str | None) -> str:
    """pretrain, sft, dpo, orpo, simpo or distill (sft for every tuned `lm` run)."""
    if objective and objective != "lm":
        return objective
    return "pretrain" if method in (None, "pretrain") else "sft"


def run_row(record: RunRecord) -> dict[str, Any]:
    """One row of the runs table."""
    run = RunDir(record.run_dir)
    exists = run.path.is_dir()
    state, _ = _state(run) if exists else ({}, None)
    status = live_status(run.path, record) if exists else "missing"
    if status == "unknown" and record.status != "unknown":
        status = record.status
    created = record.created or _mtime(run.path)
    ended = record.updated if status not in ("running",) else time.time()
    last = _last_train_record(run) if exists else {}
    tokens_per_s = state.get("median_tokens_per_s") or last.get("tokens_per_s")
    best = record.best_value if record.best_value is not None else state.get("best_val_loss")
    return {
        "id": record.run_dir, "name": record.name, "dir": record.run_dir,
        "kind": run_kind(record.objective, record.method or state.get("method")),
        "status": status, "started": _when(created), "started_ts": created,
        "duration_s": max(0.0, (ended or created) - created) if created else None,
        "step": state.get("step", record.step), "max_steps": state.get("max_steps",
                                                                         record.max_steps),
        "best_val_loss": best, "tokens_per_s": tokens_per_s,
        "model": record.model_source or ("new (" + state.get("method", "pretrain") + ")"
                                         if state else None),
        "error": state.get("error") or record.error,
    }


def _when(ts: float | None) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else None


def _last_train_record(run: RunDir, window: int = 16384) -> dict[str, Any]:
    """The last training record, from the end of `metrics.jsonl` only (a long run's log is not
    read whole for a table row)."""
    try:
        with run.metrics.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - window))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and not is_eval_record(record):
                return record
    return {}


@dataclass
class RunDetail:
    """A run's page: everything but the curves, which stream."""

    row: dict[str, Any]
    state: dict[str, Any]
    state_error: str | None
    recipe_text: str
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    models: list[dict[str, str]] = field(default_factory=list)  # what can be chatted with
    evals: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)


def find_record(registry: Registry, run_dir: str) -> RunRecord:
    """The registry's row of a run, or one made from its directory when the registry has none
    or cannot be read."""
    with contextlib.suppress(LargeForgeError, sqlite3.Error, OSError):
        record = registry.find_run(run_dir)
        if record is not None:
            return record
    path = Path(run_dir)
    return RunRecord(run_dir=run_key(path), name=path.name, status="unknown",
                     created=_mtime(path))


def run_detail(registry: Registry, run_dir: str) -> RunDetail:
    record = find_record(registry, run_dir)
    run = RunDir(record.run_dir)
    state, state_error = _state(run)
    recipe_text = _recipe_text(run)
    actions: list[dict[str, Any]] = []
    with contextlib.suppress(LargeForgeError, sqlite3.Error, OSError):
        actions = [a.to_json() for a in registry.list_actions(record.run_dir, limit=50)]
    return RunDetail(run_row(record), state, state_error, recipe_text, checkpoints(run),
                     run_models(run), run_evals(run), actions)


def _recipe_text(run: RunDir) -> str:
    try:
        return run.recipe.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def checkpoints(run: RunDir) -> list[dict[str, Any]]:
    """Every checkpoint with its size, then best/ and final/."""
    latest = run.latest_name()
    found = [{"name": path.name, "step": step, "path": str(path),
              "size": format_size(dir_size(path)), "latest": path.name == latest}
             for step, path in run.step_checkpoints()]
    for label, path in (("best", run.best), ("final", run.final)):
        if path.is_dir():
            found.append({"name": label, "step": None, "path": str(path),
                          "size": format_size(dir_size(path)), "latest": False})
    return found


def run_models(run: RunDir) -> list[dict[str, str]]:
    """The models of a run, best first: final/, best/, then checkpoints newest first."""
    from largeforge.runs import is_model_dir

    models = [{"label": f"{run.name} / {p.name}", "path": str(p)}
              for p in (run.final, run.best) if is_model_dir(p)]
    models += [{"label": f"{run.name} / {p.name}", "path": str(p)}
               for _, p in reversed(run.step_checkpoints()) if is_model_dir(p)]
    return models


def run_evals(run: RunDir) -> list[dict[str, Any]]:
    """The evaluations the dashboard ran on this run, newest first."""
    folder = run.path / EVALS_DIR
    results = []
    with contextlib.suppress(OSError):
        for path in sorted(folder.glob("eval-*.json"), reverse=True):
            with contextlib.suppress(OSError, ValueError):
                doc = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(doc, dict):
                    results.append({"file": path.name, **doc})
    return results


def metrics_series(run_dir: str) -> list[dict[str, Any]]:
    """Every complete record of the run's metrics (a torn last line is left out)."""
    return read_records(Path(run_dir))


def flat_recipe(recipe_text: str) -> dict[str, Any]:
    """section.key -> value of a recipe's YAML (empty when it cannot be read)."""
    try:
        data = yaml.safe_load(recipe_text) or {}
    except yaml.YAMLError:
        return {}
    flat: dict[str, Any] = {}
    for section, values in data.items() if isinstance(data, dict) else ():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{section}.{key}"] = value
        else:
            flat[str(section)] = values
    return flat


def compare_runs(registry: Registry, run_dirs: list[str]) -> dict[str, Any]:
    """Curves (each run's metrics, read once), a metrics table with the best of each column
    marked, and the recipes diffed key by key (only the keys where the runs differ, then the
    count of those that agree)."""
    records = [find_record(registry, d) for d in run_dirs]
    recipes = [flat_recipe(_recipe_text(RunDir(r.run_dir))) for r in records]
    keys = sorted(set().union(*recipes)) if recipes else []
    differ = [k for k in keys if len({json.dumps(r.get(k), sort_keys=True, default=str)
                                      for r in recipes}) > 1]
    columns = [("best_val_loss", "min"), ("final_loss", "min"), ("tokens_per_s", "max"),
               ("step", "max")]
    rows, series = [], {}
    for record, asked in zip(records, run_dirs, strict=True):
        series[asked] = metrics_series(record.run_dir)
        train = [r for r in series[asked] if not is_eval_record(r) and "loss" in r]
        rows.append({**run_row(record), "final_loss": train[-1]["loss"] if train else None})
    best = {}
    for column, direction in columns:
        values = [r[column] for r in rows if isinstance(r.get(column), (int, float))]
        if values:
            best[column] = min(values) if direction == "min" else max(values)
    return {
        "runs": rows, "best": best, "columns": [c for c, _ in columns],
        "diff": [{"key": k, "values": [r.get(k) for r in recipes]} for k in differ],
        "same": len(keys) - len(differ), "series": series,
    }
