"""What a run carries from step to step (`TrainState`, saved with every checkpoint) and what it
hands back when it ends (`TrainResult`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class TrainState:
    """The counters a checkpoint saves and a resume restores. Checkpoints store them as a plain
    mapping under these names (older checkpoints read the same way)."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    # (val loss, mean train loss since the eval before): a rise of the first while the second
    # falls is the overfitting warning.
    last_eval: tuple[float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def restore(self, saved: dict[str, Any]) -> None:
        """Take every counter `saved` holds; a counter it lacks keeps its value."""
        for f in fields(self):
            setattr(self, f.name, saved.get(f.name, getattr(self, f.name)))


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_dir: Path | None = None
    best_dir: Path | None = None
    best_val_loss: float | None = None
    last_val_loss: float | None = None
    stopped_early: bool = False
    interrupted: bool = False  # stopped on SIGINT with a checkpoint; no final/
    tokens_per_s: float | None = None
    mfu: float | None = None
    parameters: int = 0
    verified_only: bool = False
    device: str = ""
    precision: str = ""
    overfitting_warnings: int = 0
    rank: int = 0  # this process's rank under torchrun: rank 0 reports
    model: Any = field(default=None, repr=False)  # the trained module, for library users
