"""Atomic, exactly resumable checkpoints.

`checkpoints/step-N/` is a Hugging Face model directory (so any checkpoint loads in
`transformers`) plus `training_state.pt`: optimizer, scheduler, every RNG state, the data
position and the loop's counters. It is written into a temporary directory and renamed into
place; only then is `checkpoints/latest` replaced (temp file + rename), so a crash at any
moment leaves `latest` naming a complete checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from largeforge.atomic_files import write_atomic_text
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
    """Write a complete HF model directory atomically (temp dir + rename)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        write_model_files(model, tokenizer, tmp)
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


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
        _replace_dir(tmp, final)
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


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    state_file = checkpoint / STATE_FILE
    if not state_file.is_file():
        raise LargeForgeError(f"{checkpoint} is not a complete checkpoint: no {STATE_FILE}")
    # weights_only=False: the state holds Python RNG tuples and numpy arrays we wrote ourselves.
    return torch.load(state_file, map_location="cpu", weights_only=False)
