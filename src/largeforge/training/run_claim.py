"""Claiming a run directory: fresh, resumed or overwritten, never silently clobbered; and
finding the checkpoint `--resume` means. Training's business (it compares the recipe with the
checkpoint's), so it lives here, over `largeforge.runs`' names and paths.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from largeforge.atomic_files import (
    is_temp_name,
    locked_elsewhere,
    sweep_stale_in,
    write_atomic_text,
)
from largeforge.config import Recipe, recipe_differences, recipe_from_yaml
from largeforge.errors import LargeForgeError
from largeforge.runs.run_dir import (
    BEST_DIR,
    CHECKPOINTS_DIR,
    CONSOLIDATED_DIR,
    DISTRIBUTED_FILE,
    LATEST_FILE,
    METRICS_FILE,
    RECIPE_FILE,
    REPORT_FILE,
    RUN_STATE_FILE,
    STATE_FILE,
    TENSORBOARD_DIR,
    TOKENIZER_DIR,
    RunDir,
)

# What a run writes beside recipe.yaml before its first checkpoint, and may have written when
# it failed or was killed: cleared when such a run starts afresh.
RUN_ENTRIES = (RUN_STATE_FILE, METRICS_FILE, TENSORBOARD_DIR, TOKENIZER_DIR, REPORT_FILE,
               CHECKPOINTS_DIR, BEST_DIR, CONSOLIDATED_DIR)


def claim_run_dir(
    run_dir: Path,
    recipe: Recipe,
    *,
    resume: str | Path | None,
    overwrite: bool,
    dry_run: bool = False,
    world_size: int = 1,
    say: Callable[[str], None] | None = None,
) -> Path | None:
    """Check `run_dir` may be used and prepare it; returns the checkpoint to resume, if any.

    A directory holding another run is refused unless `overwrite`; a directory holding files
    that are not a LargeForge run is always refused (we never delete what we did not write).
    A run that saved no checkpoint (it failed or was killed before its first save) cannot be
    resumed and is nothing to keep: it starts afresh, with or without `resume`, and `say`
    hears one line about it. Temporaries of killed writers count as nothing.
    Resuming with a recipe that differs from the checkpoint's names every difference, but for
    train.grad_accum when the number of processes (`world_size`) changed and the global batch
    (batch_size x grad_accum x processes) stays the same.
    """
    if resume is not None and overwrite:
        raise LargeForgeError("--resume and --overwrite contradict each other; choose one")
    if run_dir.exists() and not run_dir.is_dir():
        raise LargeForgeError(f"output {run_dir} exists and is not a directory")
    if run_dir.is_dir() and locked_elsewhere(run_dir):
        raise LargeForgeError(
            f"{run_dir} is in use: another process is training this run; wait for it to end "
            "or choose another output.name"
        )
    run = RunDir(run_dir)
    restart = not overwrite and _names_the_run(resume, run_dir) and never_saved(run)
    if resume is not None and not restart:
        return _checkpoint_to_resume(resume, run_dir, recipe, world_size)
    if restart:
        if say is not None:
            say(f"no checkpoint was saved in {run_dir} before its run stopped: nothing to "
                "resume, so the run starts afresh")
        if not dry_run:
            _clear_run(run)
    elif _holds_anything(run_dir):
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


def never_saved(run: RunDir) -> bool:
    """Whether `run` is a run that wrote no checkpoint (nor a final model): killed or failed
    before its first save, so nothing in it can be resumed."""
    return (run.is_run() and not run.step_checkpoints() and run.latest_checkpoint() is None
            and not run.final.exists())


def _names_the_run(resume: str | Path | None, run_dir: Path) -> bool:
    """Whether `resume` means the run in `run_dir` as a whole (not one of its checkpoints)."""
    return resume in (None, LATEST_FILE) or Path(str(resume)) == run_dir


def _holds_anything(run_dir: Path) -> bool:
    """Whether `run_dir` holds anything but the temporaries of killed writers."""
    return run_dir.is_dir() and any(not is_temp_name(p.name) for p in run_dir.iterdir())


def _clear_run(run: RunDir) -> None:
    """Remove what a run that saved no checkpoint wrote, `recipe.yaml` last (it makes the
    directory a run: a clearing cut short is cleared again). Files it did not write stay."""
    for name in RUN_ENTRIES:
        path = run.path / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    sweep_stale_in(run.path)
    run.recipe.unlink(missing_ok=True)


def _checkpoint_to_resume(resume: str | Path, run_dir: Path, recipe: Recipe,
                          world_size: int) -> Path:
    checkpoint = find_checkpoint(resume, run_dir)
    saved = recipe_from_yaml(checkpoint / RECIPE_FILE)  # each checkpoint keeps its recipe
    diffs = _resume_differences(saved, recipe, checkpoint_world_size(checkpoint), world_size)
    if diffs:
        raise LargeForgeError(
            f"cannot resume {checkpoint}: the recipe differs from the checkpoint's: "
            + "; ".join(diffs)
        )
    return checkpoint


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
        ckpt = RunDir(run_dir).latest_checkpoint() or _newest_complete(RunDir(run_dir))
        if ckpt is None:
            raise LargeForgeError(f"nothing to resume: {run_dir} has no complete checkpoint")
        return ckpt
    path = Path(ref)
    if (path / STATE_FILE).is_file():
        return path
    ckpt = RunDir(path).latest_checkpoint() or _newest_complete(RunDir(path))
    if ckpt is None:
        raise LargeForgeError(f"--resume {path}: not a checkpoint nor a run with checkpoints")
    return ckpt


def _newest_complete(run: RunDir) -> Path | None:
    """The newest checkpoint holding its training state, for a run killed after renaming its
    first checkpoint into place but before `checkpoints/latest` named it."""
    if run.latest_name() is not None:
        return None  # `latest` names one that is gone: not ours to second-guess
    complete = [path for _, path in run.step_checkpoints() if (path / STATE_FILE).is_file()]
    return complete[-1] if complete else None


def checkpoint_world_size(checkpoint: Path) -> int:
    """How many processes trained the run that wrote `checkpoint` (1 without distributed.json)."""
    path = checkpoint / DISTRIBUTED_FILE
    if not path.is_file():
        return 1
    return int(json.loads(path.read_text(encoding="utf-8")).get("world_size", 1))
