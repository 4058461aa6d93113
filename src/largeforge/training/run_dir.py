"""Claiming a run directory: fresh, resumed or overwritten, never silently clobbered."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from largeforge.atomic_files import write_atomic_text
from largeforge.config import Recipe, recipe_differences, recipe_from_yaml
from largeforge.errors import LargeForgeError
from largeforge.runs import RECIPE_FILE, latest_checkpoint
from largeforge.training.checkpoint import checkpoint_world_size, find_checkpoint

RUN_STATE_FILE = "run.json"


def claim_run_dir(
    run_dir: Path,
    recipe: Recipe,
    *,
    resume: str | Path | None,
    overwrite: bool,
    dry_run: bool = False,
    world_size: int = 1,
) -> Path | None:
    """Check `run_dir` may be used and prepare it; returns the checkpoint to resume, if any.

    A directory holding another run is refused unless `overwrite`; a directory holding files
    that are not a LargeForge run is always refused (we never delete what we did not write).
    Resuming with a recipe that differs from the checkpoint's names every difference, but for
    train.grad_accum when the number of processes (`world_size`) changed and the global batch
    (batch_size x grad_accum x processes) stays the same.
    """
    if resume is not None and overwrite:
        raise LargeForgeError("--resume and --overwrite contradict each other; choose one")
    exists = run_dir.exists() and any(run_dir.iterdir())
    if run_dir.exists() and not run_dir.is_dir():
        raise LargeForgeError(f"output {run_dir} exists and is not a directory")

    if resume is not None:
        checkpoint = find_checkpoint(resume, run_dir)
        saved = recipe_from_yaml(checkpoint / "recipe.yaml")
        diffs = _resume_differences(saved, recipe, checkpoint_world_size(checkpoint),
                                    world_size)
        if diffs:
            raise LargeForgeError(
                f"cannot resume {checkpoint}: the recipe differs from the checkpoint's: "
                + "; ".join(diffs)
            )
        return checkpoint

    if exists:
        if not (run_dir / RECIPE_FILE).is_file():
            raise LargeForgeError(
                f"output directory {run_dir} is not empty and holds no LargeForge run; "
                "choose another output.name or output.dir"
            )
        if not overwrite:
            ckpt = latest_checkpoint(run_dir)
            where = f" (latest checkpoint: {ckpt.name})" if ckpt else ""
            raise LargeForgeError(
                f"{run_dir} already holds a run{where}; pass --resume to continue it or "
                "--overwrite to start over"
            )
        if not dry_run:
            shutil.rmtree(run_dir)
    if not dry_run:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic_text(run_dir / RECIPE_FILE, recipe.to_yaml())
    return None


def _resume_differences(saved: Recipe, recipe: Recipe, saved_world: int,
                        world: int) -> list[str]:
    """The recipe differences that forbid resuming. A run may move to another number of
    processes and scale train.grad_accum to keep its global batch (so it trains as before)."""
    diffs = recipe_differences(saved, recipe)
    before = saved.train.batch_size * saved.train.grad_accum * saved_world
    now = recipe.train.batch_size * recipe.train.grad_accum * world
    accum = [d for d in diffs if d.startswith("train.grad_accum:")]
    if accum and saved_world != world:
        if before == now:
            return [d for d in diffs if d not in accum]
        accum_at = diffs.index(accum[0])
        diffs[accum_at] += (f" (global batch = batch_size x grad_accum x processes: {before} "
                            f"then on {saved_world}, {now} now on {world})")
    return diffs


def write_run_state(run_dir: Path, **state: Any) -> None:
    path = run_dir / RUN_STATE_FILE
    current = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    current.update(state, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_atomic_text(path, json.dumps(current, indent=2) + "\n")
