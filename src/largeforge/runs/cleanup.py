"""Removing a run's surplus checkpoints: keep the best few (by validation loss), the last few,
and always the one `checkpoints/latest` names (resume needs it). `best/` and `final/` are never
touched: only `checkpoints/step-N/` directories are candidates.
Used by `largeforge checkpoints cleanup`.

A checkpoint is removed crash-safely: renamed to a hidden name inside `checkpoints/` first
(`.step-N.deleting-PID`), then deleted, so a crash half-way never leaves a partial `step-N/`
that looks complete; such leftovers are deleted by the next cleanup.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from largeforge.errors import LargeForgeError
from largeforge.runs.run_dir import RECIPE_FILE, RunDir, parse_step

_LEFTOVER = re.compile(r"^\.step-\d+\.deleting-\d+$")


@dataclass
class Checkpoint:
    path: Path
    step: int
    val_loss: float | None  # the evaluation at this step, if there was one
    size: int  # bytes of its files


@dataclass
class CleanupPlan:
    run_dir: Path
    keep: dict[Path, list[str]] = field(default_factory=dict)  # path -> why it is kept
    remove: list[Checkpoint] = field(default_factory=list)
    leftovers: list[Checkpoint] = field(default_factory=list)  # interrupted earlier deletions
    checkpoints: list[Checkpoint] = field(default_factory=list)

    @property
    def bytes_to_free(self) -> int:
        return sum(c.size for c in self.remove) + sum(c.size for c in self.leftovers)


@dataclass
class CleanupResult:
    plan: CleanupPlan
    removed: list[Checkpoint]
    freed: int  # bytes
    dry_run: bool


def dir_size(path: Path) -> int:
    """Bytes of the regular files under `path` (links are not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                stat = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if not os.path.islink(os.path.join(root, name)):
                total += stat.st_size
    return total


def eval_losses(run_dir: Path) -> dict[int, float]:
    """step -> validation loss, from the evaluation records of `metrics.jsonl` (the last record
    of a step wins: a resumed run replays its steps; a torn line is skipped)."""
    from largeforge.runs.plots import read_metrics

    return {int(r["step"]): float(r["val_loss"]) for r in read_metrics(RunDir(run_dir).metrics).eval
            if isinstance(r.get("val_loss"), (int, float))}


def plan_cleanup(run_dir: Path, keep_best: int, keep_last: int) -> CleanupPlan:
    """Which checkpoints stay and which go; changes nothing."""
    for flag, value in (("--keep-best", keep_best), ("--keep-last", keep_last)):
        if value < 0:
            raise LargeForgeError(f"{flag} must be 0 or more, not {value}")
    run = RunDir(run_dir)
    run_dir = run.path
    if not run_dir.is_dir() or not run.is_run():
        raise LargeForgeError(f"{run_dir} is not a run directory (no {RECIPE_FILE})")
    plan = CleanupPlan(run_dir=run_dir)
    root = run.checkpoints
    if not root.is_dir():
        return plan
    losses = eval_losses(run_dir)
    for path in sorted(root.iterdir()):
        step = parse_step(path.name)
        if path.is_dir() and not path.is_symlink() and step is not None:
            plan.checkpoints.append(Checkpoint(path, step, losses.get(step), dir_size(path)))
        elif path.is_dir() and _LEFTOVER.match(path.name):
            plan.leftovers.append(Checkpoint(path, -1, None, dir_size(path)))
    plan.checkpoints.sort(key=lambda c: c.step)

    def keep(checkpoint: Checkpoint, why: str) -> None:
        plan.keep.setdefault(checkpoint.path, []).append(why)

    latest = run.latest_name()
    for checkpoint in plan.checkpoints:
        if checkpoint.path.name == latest:
            keep(checkpoint, "latest (resume)")
    evaluated = [c for c in plan.checkpoints if c.val_loss is not None]
    for checkpoint in sorted(evaluated, key=lambda c: (c.val_loss, c.step))[:keep_best]:
        keep(checkpoint, f"best val_loss {checkpoint.val_loss:.4f}")
    for checkpoint in plan.checkpoints[len(plan.checkpoints) - keep_last:] if keep_last else []:
        keep(checkpoint, "last")
    plan.remove = [c for c in plan.checkpoints if c.path not in plan.keep]
    return plan


def cleanup_checkpoints(
    run_dir: Path, keep_best: int, keep_last: int, *, dry_run: bool = False,
    on_remove: Callable[[Checkpoint], None] | None = None,
) -> CleanupResult:
    """Remove what `plan_cleanup` says (nothing with `dry_run`); `on_remove` is told of each
    checkpoint as it goes. A checkpoint that vanished meanwhile (the run pruned it) is skipped."""
    plan = plan_cleanup(run_dir, keep_best, keep_last)
    removed: list[Checkpoint] = []
    for checkpoint in [*plan.leftovers, *plan.remove]:
        if dry_run:
            removed.append(checkpoint)
        elif _remove(RunDir(plan.run_dir), checkpoint.path):
            removed.append(checkpoint)
        else:
            continue
        if on_remove is not None:
            on_remove(checkpoint)
    return CleanupResult(plan, removed, sum(c.size for c in removed), dry_run)


def _remove(run: RunDir, path: Path) -> bool:
    if _LEFTOVER.match(path.name):
        doomed = path
    else:
        # Checked again here, not only in the plan: a run still training may have moved
        # `latest` since; whatever it names now stays.
        if run.latest_name() == path.name:
            return False
        doomed = path.with_name(f".{path.name}.deleting-{os.getpid()}")
        try:
            os.replace(path, doomed)
        except FileNotFoundError:
            return False
    shutil.rmtree(doomed)
    return True


def format_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"
