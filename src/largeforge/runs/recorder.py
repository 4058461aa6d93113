"""`RunRecorder`: how a training run keeps its registry row up to date without ever failing
because of it. Training is what matters; the registry is a shared index of runs, so a registry
that cannot be written (locked beyond the timeout, a read-only disk, a corrupt file) is
reported once on the console and training goes on.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from largeforge.errors import LargeForgeError
from largeforge.runs.database import default_registry_path
from largeforge.runs.registry import Registry, RunRecord, recipe_hash, run_key
from largeforge.runs.run_dir import RunDir


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
        record = RunRecord(
            run_dir=run_key(run_dir), name=Path(run_dir).name, status="running",
            recipe_hash=recipe_hash(recipe.to_yaml()), objective=recipe.train.objective,
            method=method,
            model_source=recipe.model.from_pretrained or f"preset:{recipe.model.preset}",
            pid=os.getpid(), hostname=socket.gethostname(),
        )
        self.record = record
        if resumed:  # keep what the registry knows (created, best metric) and update it
            previous = self._call(lambda reg: reg.find_run(record.run_dir))
            if previous is not None:
                keep = {k: getattr(previous, k) for k in (
                    "created", "step", "max_steps", "best_metric", "best_value", "best_step",
                    "best_dir", "latest_checkpoint")}
                self.record = dataclasses.replace(record, **keep)
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
        run = RunDir(run_dir)
        latest = run.latest_checkpoint()
        self.update(
            step=step, latest_checkpoint=run_key(latest) if latest else None,
            best_dir=run_key(run.best) if run.best.is_dir() else None,
            **_best(best_val_loss, best_step),
        )

    def finish(self, run_dir: Path, status: str, step: int, best_val_loss: float | None,
               best_step: int | None) -> None:
        if self.record is None:
            return
        run = RunDir(run_dir)
        latest = run.latest_checkpoint()
        self.record = dataclasses.replace(
            self.record, status=status, step=step, error=None,
            latest_checkpoint=run_key(latest) if latest else None,
            best_dir=run_key(run.best) if run.best.is_dir() else None,
            final_dir=run_key(run.final) if run.final.is_dir() else None,
            **_best(best_val_loss, best_step),
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

    def _call(self, action: Callable[[Registry], Any]) -> Any:
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
