"""What a run directory holds, named once: the `RunDir` value object and the `run.json` policy.

A run directory `runs/<name>/` holds `recipe.yaml` (written first: it is what makes a directory
a run), `run.json` (the run's own account of itself), `metrics.jsonl`, `tensorboard/`,
`tokenizer/` (a tokenizer trained for the run), `checkpoints/step-N/` with `checkpoints/latest`
naming the newest complete one, `best/`, `final/`, `report.html` and, after
`largeforge checkpoints consolidate`, `consolidated/step-N/`. Every module that needs one of
these names takes it from here, so renaming a file is a one-line change.

`run.json` policy (the one `read_run_state` / `RunDir.read_state`):
  * missing -> `{}`: a run that has not got that far yet is normal, not an error;
  * present but unreadable, not JSON or not a JSON object -> `RunStateError`, naming the file.
    It is written atomically (`write_atomic_text`), so a damaged file is real damage, never a
    half-written one; reading it as `{}` would hide that, and `write_state` would then
    overwrite every field it held. `RunStateError` is a `LargeForgeError` (the CLI prints it
    as one line) and a `ValueError` (code that tolerated json's own errors still does).
    Callers that only show a status (`runs show`, `runs logs --follow`) catch it and fall back
    on the registry row.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from largeforge.atomic_files import write_atomic_text
from largeforge.errors import LargeForgeError

# -- the names in a run directory --------------------------------------------------------------
RECIPE_FILE = "recipe.yaml"  # also in each checkpoint: the recipe it was trained with
RUN_STATE_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
TOKENIZER_DIR = "tokenizer"
REPORT_FILE = "report.html"
CHECKPOINTS_DIR = "checkpoints"
# The pointer file in checkpoints/, and the word `--resume` / `--checkpoint` take for it.
LATEST_FILE = "latest"
BEST_DIR = "best"
FINAL_DIR = "final"
CONSOLIDATED_DIR = "consolidated"

# -- the names in a checkpoint directory (checkpoints/step-N/) -------------------------------------
STATE_FILE = "training_state.pt"  # optimizer, scheduler, RNG states, data position, counters
# Written by runs on several processes (training/distributed.py): how many and in which mode.
DISTRIBUTED_FILE = "distributed.json"

_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    """`step-N`: the directory name of the checkpoint written after `step` optimizer steps."""
    return f"step-{step}"


def parse_step(name: str) -> int | None:
    """N for a name `step-N`, else None (temporary and half-deleted directories start with .)."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


class RunStateError(LargeForgeError, ValueError):
    """`run.json` exists but cannot be used; see the module docstring for why it raises."""


@dataclass(frozen=True)
class RunDir:
    """A run directory's paths and the little reading and writing that needs no torch.

    A value object: building one touches no file, so it describes runs that do not exist yet
    (a run about to be claimed) as well as finished ones. `RunDir(path)` accepts a str too.
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    # -- files and directories ---------------------------------------------------------------

    @property
    def recipe(self) -> Path:
        return self.path / RECIPE_FILE

    @property
    def state_file(self) -> Path:
        return self.path / RUN_STATE_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER_DIR

    @property
    def report(self) -> Path:
        return self.path / REPORT_FILE

    @property
    def best(self) -> Path:
        return self.path / BEST_DIR

    @property
    def final(self) -> Path:
        return self.path / FINAL_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def latest_file(self) -> Path:
        return self.checkpoints / LATEST_FILE

    @property
    def consolidated(self) -> Path:
        return self.path / CONSOLIDATED_DIR

    def checkpoint(self, step: int | str) -> Path:
        """`checkpoints/step-N/` for a step number, or `checkpoints/<name>/` for a name."""
        return self.checkpoints / (checkpoint_name(step) if isinstance(step, int) else step)

    # -- what is there -------------------------------------------------------------------------

    def is_run(self) -> bool:
        """Whether this is a LargeForge run: `recipe.yaml` is the first file a run writes."""
        return self.recipe.is_file()

    def step_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, directory) of every `checkpoints/step-N/`, by step; complete or not (a
        checkpoint is renamed into place complete, but a cleanup may be removing one)."""
        root = self.checkpoints
        if not root.is_dir():
            return []
        found = ((parse_step(p.name), p) for p in root.iterdir() if p.is_dir())
        return sorted((step, p) for step, p in found if step is not None)

    def latest_name(self) -> str | None:
        """What `checkpoints/latest` says, whether or not that directory still exists."""
        try:
            return self.latest_file.read_text(encoding="utf-8").strip() or None
        except OSError:
            return None

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint named by `checkpoints/latest`, which is only ever written after the
        checkpoint it names is complete."""
        if not self.latest_file.is_file():
            return None
        target = self.checkpoints / self.latest_file.read_text(encoding="utf-8").strip()
        return target if target.is_dir() else None

    def model_dir(self) -> Path | None:
        """The model a run stands for: `final/`, else `best/`, else its latest checkpoint (the
        first that is a model directory), else None."""
        for candidate in (self.final, self.best):
            if is_model_dir(candidate):
                return candidate
        latest = self.latest_checkpoint()
        return latest if latest is not None and is_model_dir(latest) else None

    # -- run.json ------------------------------------------------------------------------------

    def read_state(self) -> dict[str, Any]:
        """`run.json`: {} when missing; RunStateError when damaged (see the module docstring)."""
        path = self.state_file
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except IsADirectoryError:
            return {}  # not ours to judge; a run never writes one
        except (OSError, UnicodeDecodeError) as exc:
            raise RunStateError(f"cannot read {path}: {exc}") from exc
        try:
            state = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RunStateError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(state, dict):
            raise RunStateError(f"{path} must hold a JSON object")
        return state

    def write_state(self, **fields: Any) -> None:
        """Merge `fields` into `run.json` and stamp `updated`, atomically: a reader (`runs
        show`, `runs logs --follow`, another process) sees the old or the new file, never a mix.
        Only the training run's main process writes it, so read-merge-write needs no lock."""
        current = self.read_state()
        current.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        write_atomic_text(self.state_file, json.dumps(current, indent=2) + "\n")


def is_model_dir(path: Path) -> bool:
    """A Hugging Face model directory, or a PEFT adapter directory (which names its base)."""
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def is_run_dir(path: Path) -> bool:
    """Whether `path` holds a LargeForge run (see `RunDir.is_run`)."""
    return RunDir(path).is_run()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """`RunDir(run_dir).latest_checkpoint()`, for the many callers holding a plain Path."""
    return RunDir(run_dir).latest_checkpoint()


def read_run_state(run_dir: Path) -> dict[str, Any]:
    """`RunDir(run_dir).read_state()`: {} when missing, RunStateError when damaged."""
    return RunDir(run_dir).read_state()


def write_run_state(run_dir: Path, **state: Any) -> None:
    """`RunDir(run_dir).write_state(**state)`: merge into `run.json`, stamped `updated`."""
    RunDir(run_dir).write_state(**state)
