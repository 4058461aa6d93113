"""Claiming a run directory: fresh, resumed or overwritten, never silently clobbered; and
finding the checkpoint `--resume` means. Training's business (it compares the recipe with the
checkpoint's), so it lives here, over `largeforge.runs`' names and paths.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from largeforge.atomic_files import write_atomic_text
from largeforge.config import Recipe, recipe_differences, recipe_from_yaml
from largeforge.errors import LargeForgeError
from largeforge.runs.run_dir import (
    DISTRIBUTED_FILE,
    LATEST_FILE,
    RECIPE_FILE,
    STATE_FILE,
    RunDir,
)


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
    run = RunDir(run_dir)
    exists = run_dir.exists() and any(run_dir.iterdir())
    if run_dir.exists() and not run_dir.is_dir():
        raise LargeForgeError(f"output {run_dir} exists and is not a directory")

    if resume is not None:
        checkpoint = find_checkpoint(resume, run_dir)
        saved = recipe_from_yaml(checkpoint / RECIPE_FILE)  # each checkpoint keeps its recipe
        diffs = _resume_differences(saved, recipe, checkpoint_world_size(checkpoint),
                                    world_size)
        if diffs:
            raise LargeForgeError(
                f"cannot resume {checkpoint}: the recipe differs from the checkpoint's: "
                + "; ".join(diffs)
            )
        return checkpoint

    if exists:
        if not run.is_run():
            raise LargeForgeError(
                f"output directory {run_dir} is not empty and holds no LargeForge run; "
                "choose another output.name or output.dir"
            )
        if not overwrite:
            ckpt = run.latest_checkpoint()
            where = f" (latest checkpoint: {ckpt.name})" if ckpt else ""
            raise LargeForgeError(
                f"{run_dir} already holds a run{where}; pass --resume to continue it or "
                "--overwrite to start over"
            )
        if not dry_run:
            shutil.rmtree(run_dir)
    if not dry_run:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic_text(run.recipe, recipe.to_yaml())
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


def find_checkpoint(ref: str | Path | None, run_dir: Path) -> Path:
    """`--resume` (ref None or "latest") -> the run's latest; else a checkpoint dir or run dir."""
    if ref is None or ref == LATEST_FILE:
        ckpt = RunDir(run_dir).latest_checkpoint()
        if ckpt is None:
            raise LargeForgeError(f"nothing to resume: {run_dir} has no complete checkpoint")
        return ckpt
    path = Path(ref)
    if (path / STATE_FILE).is_file():
        return path
    ckpt = RunDir(path).latest_checkpoint()
    if ckpt is None:
        raise LargeForgeError(f"--resume {path}: not a checkpoint nor a run with checkpoints")
    return ckpt


def checkpoint_world_size(checkpoint: Path) -> int:
    """How many processes trained the run that wrote `checkpoint` (1 without distributed.json)."""
    path = checkpoint / DISTRIBUTED_FILE
    if not path.is_file():
        return 1
    return int(json.loads(path.read_text(encoding="utf-8")).get("world_size", 1))
