"""Atomic, exactly resumable checkpoints.

`checkpoints/step-N/` is a Hugging Face model directory (so any checkpoint loads in
`transformers`) plus `training_state.pt`: optimizer, scheduler, every RNG state, the data
position and the loop's counters. It is written into a temporary directory and renamed into
place; only then is `checkpoints/latest` replaced (temp file + rename), so a crash at any
moment leaves `latest` naming a complete checkpoint.
"""

from __future__ import annotations

import pickle
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from largeforge.atomic_files import replace_path, temp_dir, write_atomic_text
from largeforge.damaged_files import DamagedFileError, reading
from largeforge.errors import LargeForgeError
from largeforge.runs import RECIPE_FILE, STATE_FILE, RunDir, checkpoint_name


def capture_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])



def write_model_files(model: Any, tokenizer: Any, directory: Path) -> None:
    """save_pretrained without transformers' per-save progress bar (the loop has its own)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def save_model_dir(model: Any, tokenizer: Any, directory: Path) -> None:
    """Write a complete HF model directory atomically (temp dir + rename); the temp dir of a
    killed earlier write is swept first."""
    with temp_dir(directory) as tmp:
        write_model_files(model, tokenizer, tmp)
        replace_path(tmp, directory)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    training_state: dict[str, Any],
    recipe_yaml: str,
    keep: int,
) -> Path:
    """Write `checkpoints/step-N/`, point `latest` at it, and prune old checkpoints."""
    tmp = new_checkpoint_dir(run_dir, step)
    try:
        write_model_files(model, tokenizer, tmp)
        write_checkpoint_state(tmp, training_state, recipe_yaml)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_checkpoint(run_dir, tmp, step, keep)


def new_checkpoint_dir(run_dir: Path, step: int) -> Path:
    """A fresh temporary directory next to where `step-N/` will go, to fill and commit."""
    root = RunDir(run_dir).checkpoints
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=root, prefix=f".{checkpoint_name(step)}.tmp-"))


def write_checkpoint_state(
    directory: Path, training_state: dict[str, Any], recipe_yaml: str
) -> None:
    """The recipe and `training_state.pt` (with this process's RNG states) of a checkpoint."""
    (directory / RECIPE_FILE).write_text(recipe_yaml, encoding="utf-8")
    state = dict(training_state, rng=capture_rng_state())
    torch.save(state, directory / STATE_FILE)


def commit_checkpoint(run_dir: Path, tmp: Path, step: int, keep: int) -> Path:
    """Rename a filled temporary directory to `step-N/`, then point `latest` at it and prune."""
    run = RunDir(run_dir)
    final = run.checkpoint(step)
    try:
        replace_path(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomic_text(run.latest_file, final.name + "\n")
    _prune(run, keep=keep, protect=final)
    return final


def _prune(run: RunDir, keep: int, protect: Path) -> None:
    for _, path in run.step_checkpoints()[:-keep]:
        if path != protect:
            shutil.rmtree(path, ignore_errors=True)
    # Leftovers of a crash in the middle of a write.
    for p in run.checkpoints.glob(".step-*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


# What torch.load raises on a truncated or garbage file: a zip archive it cannot read
# (RuntimeError), a pickle that is not one, or no bytes at all.
TORCH_FILE_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, AttributeError)
STATE_KEYS = ("data", "rng")  # in every training_state.pt (the optimizer not in FSDP's)


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    state_file = checkpoint / STATE_FILE
    if not state_file.is_file():
        raise LargeForgeError(f"{checkpoint} is not a complete checkpoint: no {STATE_FILE}")
    remedy = checkpoint_remedy(checkpoint)
    state = load_torch_file(state_file, remedy)
    if not isinstance(state, dict):
        raise DamagedFileError(
            state_file, f"a {type(state).__name__} where a dictionary is expected", remedy)
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise DamagedFileError(state_file, f"no {missing[0]!r} entry", remedy)
    return state


def load_torch_file(path: Path, remedy: str) -> Any:
    """What torch.save wrote to `path` (a checkpoint's own file); a damaged file is named."""
    with reading(path, remedy, TORCH_FILE_ERRORS):
        # weights_only=False: it holds Python RNG tuples and numpy arrays we wrote ourselves.
        return torch.load(path, map_location="cpu", weights_only=False)


def checkpoint_remedy(checkpoint: Path) -> str:
    """What to do about a damaged file in `checkpoint`: resume from the one before, if any."""
    here = checkpoint.resolve()
    steps = RunDir(here.parent.parent).step_checkpoints()
    mine = next((step for step, path in steps if path == here), None)
    earlier = [path for step, path in steps if path != here and (mine is None or step < mine)]
    if earlier:
        before = checkpoint.parent / earlier[-1].name  # named as the checkpoint was
        return f"resume from an earlier checkpoint (--resume {before}) or restore the file"
    return "restore the file, or start the run again (--overwrite)"


@contextmanager
def resuming_from(checkpoint: Path | None) -> Iterator[None]:
    """A damaged file of `checkpoint` (its model, adapter or tokenizer files) is reported with
    what to do about a damaged checkpoint."""
    try:
        yield
    except DamagedFileError as damaged:
        if checkpoint is None or not damaged.path.resolve().is_relative_to(checkpoint.resolve()):
            raise
        raise damaged.with_remedy(checkpoint_remedy(checkpoint)) from None
