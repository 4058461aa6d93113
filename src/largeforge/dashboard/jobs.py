"""The processes the dashboard starts: training runs, evals, exports and inference servers.

Each is `largeforge ...` in a process of its own, in a new session, with its output in a log
file under the dashboard's state directory. So a run never shares the dashboard's interpreter
(the dashboard cannot block or slow its steps) and outlives it: a dashboard that crashes or is
stopped loses nothing, and the next one finds the runs again through the registry and their
directories. Jobs themselves (an eval's table, an export's proof) are remembered in memory and
in `jobs.jsonl`, so a restarted dashboard still lists what it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from largeforge.atomic_files import write_atomic_text
from largeforge.runs import process_alive

JOB_KINDS = ("train", "eval", "export", "serve")


def largeforge_argv(*args: str) -> list[str]:
    """`largeforge ARGS` with this interpreter, so a job runs the same installation."""
    return [sys.executable, "-m", "largeforge", *args]


@dataclass
class Job:
    id: str
    kind: str  # one of JOB_KINDS
    argv: list[str]
    log: str
    started: float
    pid: int | None = None
    run_dir: str | None = None  # the run it trains, or the run whose model it uses
    model: str | None = None
    target: str | None = None  # an export's output, an eval's results file, a server's URL
    status: str = "running"  # running, done, failed, stopped
    returncode: int | None = None
    result: dict[str, Any] = field(default_factory=dict)  # what the job's follow-up found

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["log_tail"] = log_tail(Path(self.log))
        data["command"] = " ".join(["largeforge", *self.argv[3:]])
        return data


def log_tail(path: Path, limit: int = 4000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


class Jobs:
    """The jobs of one dashboard: start, watch (a thread per job waits for it), stop."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.logs = state_dir / "logs"
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        try:
            lines = (self.state_dir / "jobs.json").read_text(encoding="utf-8")
            saved = json.loads(lines)
        except (OSError, ValueError):
            return
        for data in saved if isinstance(saved, list) else []:
            try:
                job = Job(**data)
            except TypeError:
                continue
            if job.status == "running" and not process_alive(job.pid, None):
                job.status = "done" if job.returncode == 0 else "ended"
            self._jobs[job.id] = job

    def _save(self) -> None:
        jobs = [asdict(j) for j in list(self._jobs.values())[-200:]]
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            write_atomic_text(self.state_dir / "jobs.json", json.dumps(jobs, indent=1) + "\n")
        except OSError:  # the jobs still run; only the list would be lost on a restart
            pass

    def start(self, kind: str, argv: list[str], *, run_dir: str | None = None,
              model: str | None = None, target: str | None = None, cwd: Path | None = None,
              then: Callable[[Job], None] | None = None, env: dict[str, str] | None = None,
              ) -> Job:
        """Start `argv` detached (its own session); `then(job)` runs after it exits, in the
        watching thread, to fill `job.result` (an eval's table, an export's proof)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        job_id = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        log = self.logs / f"{job_id}.log"
        job = Job(job_id, kind, argv, str(log), time.time(), run_dir=run_dir, model=model,
                  target=target)
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=cwd, start_new_session=True, env={**os.environ, **(env or {})},
            )
        job.pid = process.pid
        with self._lock:
            self._jobs[job_id] = job
            self._save()
        threading.Thread(target=self._watch, args=(job, process, then), daemon=True,
                         name=f"job {job_id}").start()
        return job

    def _watch(self, job: Job, process: subprocess.Popen[bytes],
               then: Callable[[Job], None] | None) -> None:
        job.returncode = process.wait()
        if job.status == "running":
            job.status = "done" if job.returncode == 0 else "failed"
        if then is not None and job.returncode == 0:
            try:
                then(job)
            except Exception as exc:  # noqa: BLE001 - shown on the job, never kills the thread
                job.result["error"] = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._save()

    def stop(self, job_id: str, sig: int = signal.SIGINT) -> Job:
        job = self.get(job_id)
        if job.status == "running" and job.pid is not None:
            try:
                os.kill(job.pid, sig)
            except ProcessLookupError:
                pass
            job.status = "stopped"
            with self._lock:
                self._save()
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def list(self, kind: str | None = None) -> list[Job]:
        with self._lock:
            jobs = list(self._jobs.values())
        return [j for j in reversed(jobs) if kind is None or j.kind == kind]

    def stop_all_servers(self) -> None:
        """On shutdown: inference servers are the dashboard's own; runs are left running."""
        for job in self.list("serve"):
            if job.status == "running":
                self.stop(job.id, signal.SIGTERM)
