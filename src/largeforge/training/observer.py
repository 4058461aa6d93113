"""Everything a run tells the world, behind one object the trainer calls at each phase: the
console progress, `metrics.jsonl` and TensorBoard, `run.json`, the runs registry and, at the
end, `report.html`. Ranks other than 0 get `NullObserver`: they train alongside rank 0 and leave
the telling to it.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from largeforge.runs import RunDir, RunRecorder
from largeforge.training.logging import MetricsLogger, ProgressReporter
from largeforge.training.state import TrainResult

ReportWriter = Callable[[Path], Path]  # run directory -> the report it wrote


class RunObserver:
    """Rank 0's observer. The registry recorder never raises; a report that cannot be written
    is a warning, since the run itself is done and saved by then."""

    def __init__(self, console: Console, write_report: ReportWriter | None = None) -> None:
        self.console = console
        self.recorder = RunRecorder(console)
        self.write_report = write_report
        self.run: RunDir | None = None
        self._logger: MetricsLogger | None = None
        self._progress: ProgressReporter | None = None

    # -- phases --------------------------------------------------------------------------------

    def claimed(self, run_dir: Path, recipe: Any, *, resumed: bool) -> None:
        """The run directory is ours: the run enters the registry."""
        self.run = RunDir(run_dir)
        self.recorder.start(run_dir, recipe, resumed=resumed)

    def started(self, *, step: int, max_steps: int, resumed: bool, **facts: Any) -> None:
        """Training begins at `step`: logs open (cut back to the step on resume), run.json
        says running, with `facts` (method, parameters, hardware)."""
        assert self.run is not None
        self._logger = MetricsLogger(self.run.path, resume_step=step if resumed else None)
        self._progress = ProgressReporter(max_steps, step, self.console)
        self.run.write_state(status="running", step=step, max_steps=max_steps, **facts,
                             pid=os.getpid(), hostname=socket.gethostname(), error=None)
        self.recorder.update(step=step, max_steps=max_steps)

    def logged(self, step: int, record: dict[str, Any] | None) -> None:
        """A step ended; `record` (train or eval metrics) when it logged one."""
        if record is not None and self._logger is not None:
            self._logger.log(record)
        if self._progress is not None:
            self._progress.update(step, record)

    def message(self, text: str) -> None:
        if self._progress is not None:
            self._progress.message(text)
        else:
            self.console.print(text, highlight=False)

    def checkpointed(self, step: int, best_val_loss: float | None,
                     best_step: int | None) -> None:
        assert self.run is not None
        self.run.write_state(status="running", step=step)
        self.recorder.checkpoint(self.run.path, step, best_val_loss, best_step)

    def stopped(self) -> None:
        """The step loop ended, however: the logs are closed."""
        if self._progress is not None:
            self._progress.close()
        if self._logger is not None:
            self._logger.close()

    def finished(self, result: TrainResult, best_step: int | None) -> None:
        assert self.run is not None
        status = "stopped_early" if result.stopped_early else "completed"
        self.run.write_state(
            status=status, step=result.steps, best_val_loss=result.best_val_loss,
            best_step=best_step, last_val_loss=result.last_val_loss,
            median_tokens_per_s=result.tokens_per_s, median_mfu=result.mfu,
        )
        self.recorder.finish(self.run.path, status, result.steps, result.best_val_loss,
                             best_step)
        self._report()

    def interrupted(self, step: int, best_val_loss: float | None,
                    best_step: int | None) -> None:
        """Stopped on request (SIGINT) after saving checkpoint `step`: resumable."""
        assert self.run is not None
        self.run.write_state(status="stopped", step=step, best_val_loss=best_val_loss,
                             best_step=best_step)
        self.recorder.finish(self.run.path, "stopped", step, best_val_loss, best_step)
        self.message(f"stopped at step {step}; continue with --resume")

    def failed(self, exc: BaseException) -> None:
        """Registry row and run.json say `failed`, with the message (runs that never claimed
        their directory have neither)."""
        if self.recorder.record is None:
            return
        self.recorder.fail(exc)  # replaces the record with one that holds the message
        record = self.recorder.record
        with contextlib.suppress(OSError, ValueError):
            RunDir(record.run_dir).write_state(status="failed", error=record.error)

    def _report(self) -> None:
        assert self.run is not None
        if self.write_report is None:
            return
        try:
            path = self.write_report(self.run.path)
        except Exception as exc:  # noqa: BLE001 - any failure here must not fail a finished run
            self.console.print(f"[yellow]warning[/]: could not write the run report: {exc}")
            return
        self.console.print(f"report: {path}")


class NullObserver(RunObserver):
    """Ranks other than 0: nothing is printed, logged or recorded."""

    def __init__(self) -> None:  # no registry recorder: nothing is recorded from here
        self.console = Console(quiet=True)
        self.write_report = None
        self.run = None
        self._logger = None
        self._progress = None

    def claimed(self, run_dir: Path, recipe: Any, *, resumed: bool) -> None:
        self.run = RunDir(run_dir)

    def started(self, *, step: int, max_steps: int, resumed: bool, **facts: Any) -> None:
        pass

    def logged(self, step: int, record: dict[str, Any] | None) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def checkpointed(self, step: int, best_val_loss: float | None,
                     best_step: int | None) -> None:
        pass

    def finished(self, result: TrainResult, best_step: int | None) -> None:
        pass

    def interrupted(self, step: int, best_val_loss: float | None,
                    best_step: int | None) -> None:
        pass

    def failed(self, exc: BaseException) -> None:
        pass
