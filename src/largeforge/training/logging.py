"""Where a run reports: `metrics.jsonl`, TensorBoard events and the console.

Every record in `metrics.jsonl` carries its `step`. On resume the file is cut back to the
checkpoint's step (records a killed run wrote after its last checkpoint are replayed), and
TensorBoard's `purge_step` does the same for the event files, so a resumed run's logs equal
the uninterrupted run's.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from largeforge.atomic_files import write_atomic_text
from largeforge.runs import RunDir


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only records up to and including `last_step`."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= last_step
    ]
    write_atomic_text(path, "".join(line + "\n" for line in kept))


class MetricsLogger:
    """Append-only JSONL plus TensorBoard scalars."""

    def __init__(self, run_dir: Path, resume_step: int | None = None) -> None:
        run = RunDir(run_dir)
        self.path = run.metrics
        if resume_step is not None:
            truncate_metrics(self.path, resume_step)
        self._file = self.path.open("a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter

        purge = resume_step + 1 if resume_step is not None else None
        self._tb = SummaryWriter(log_dir=str(run.tensorboard), purge_step=purge)

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                tag = "val/" + key[4:] if key.startswith("val_") else "train/" + key
                self._tb.add_scalar(tag, value, step)

    def close(self) -> None:
        self._file.close()
        self._tb.flush()
        self._tb.close()


class ProgressReporter:
    """A live progress bar in a terminal; plain log lines elsewhere (CI, pipes, files)."""

    def __init__(self, total_steps: int, start_step: int, console: Console | None = None) -> None:
        self.console = console or Console(stderr=False)
        self.interactive = self.console.is_terminal and sys.stdout.isatty()
        self.total = total_steps
        self._progress: Progress | None = None
        self._task = None
        self._start_time = time.perf_counter()
        self._start_step = start_step
        if self.interactive:
            self._progress = Progress(
                TextColumn("[bold]step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step,
                                                 stats="")

    def eta_seconds(self, step: int) -> float:
        done = step - self._start_step
        if done <= 0:
            return float("nan")
        per_step = (time.perf_counter() - self._start_time) / done
        return per_step * (self.total - step)

    def update(self, step: int, record: dict[str, Any] | None) -> None:
        text = format_record(record) if record else None
        if self._progress is not None and self._task is not None:
            if text:
                self._progress.update(self._task, completed=step, stats=text)
            else:
                self._progress.update(self._task, completed=step)
        elif text:
            eta = self.eta_seconds(step)
            eta_text = f" | ETA {eta:,.0f}s" if eta == eta else ""
            self.console.print(f"step {step}/{self.total} | {text}{eta_text}", highlight=False)

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def format_record(record: dict[str, Any]) -> str:
    parts = []
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "lr" in record:
        parts.append(f"lr {record['lr']:.2e}")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if "val_loss" in record:
        parts.append(f"val loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.2f})")
    return " | ".join(parts)
