"""What the dashboard does to runs and models. Every action runs the CLI's own command (so it
does exactly what the CLI does) and is written to the registry's action log.

    launch    `largeforge train ...` from the form, after `--verify-only` passed
    stop      SIGINT to the run's process: it saves a checkpoint and ends as `stopped`
    resume    the run's recipe again with `--resume`
    cleanup   `largeforge checkpoints cleanup RUN` (the best and the latest stay)
    eval      `largeforge eval --model M --data F --output <run>/evals/eval-<time>.json`
    export    `largeforge export M --format F --output ...`, then the runtime proof
    serve     `largeforge serve inference --model M --port P` (and stopping it)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from largeforge.dashboard.jobs import Job, Jobs, largeforge_argv
from largeforge.dashboard.launch_form import Launch, build_launch, error_line, verify
from largeforge.dashboard.runs_view import EVALS_DIR, find_record
from largeforge.errors import LargeForgeError
from largeforge.runs import ActionRecord, Registry, RunDir, process_alive
from largeforge.runs.registry import run_key

EXPORT_FORMATS = ("gguf", "ollama", "hf", "onnx", "torchscript")


@dataclass
class Dashboard:
    """The dashboard's state: where runs go, the registry, the jobs it started."""

    registry: Registry
    runs_dir: Path
    state_dir: Path
    jobs: Jobs

    @classmethod
    def create(cls, registry_path: Path | None, runs_dir: Path,
               state_dir: Path | None = None) -> Dashboard:
        registry = Registry(registry_path, create=False, lazy=True)
        state = state_dir or registry.path.parent / "dashboard"
        return cls(registry, runs_dir.resolve(), state, Jobs(state))

    def record(self, action: str, run_dir: str | None, detail: str) -> None:
        """Into the registry's action log; a registry that cannot be written loses the entry,
        never the action."""
        with contextlib.suppress(LargeForgeError, sqlite3.Error, OSError):
            self.registry.record_action(ActionRecord(action, run_dir, detail))

    def _env(self) -> dict[str, str]:
        return {"LARGEFORGE_REGISTRY": str(self.registry.path)}

    # -- runs -----------------------------------------------------------------------------------

    def check_launch(self, command: str, values: dict[str, str]) -> Launch:
        launch = build_launch(command, values, self.runs_dir)
        if not launch.errors:
            verify(launch, largeforge_argv(), self.runs_dir.parent,
                   env={**os.environ, **self._env()})
        return launch

    def launch(self, command: str, values: dict[str, str]) -> tuple[Launch, Job | None]:
        launch = self.check_launch(command, values)
        if launch.errors:
            return launch, None
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        job = self.jobs.start("train", largeforge_argv(*launch.argv),
                              run_dir=str(launch.run_dir), env=self._env())
        self.record("launch", run_key(launch.run_dir), " ".join(["largeforge", *launch.argv]))
        return launch, job

    def run_pid(self, run_dir: str) -> int | None:
        """The pid of a running run (run.json's, else the registry's), None when not running."""
        record = find_record(self.registry, run_dir)
        with contextlib.suppress(ValueError, OSError):
            state = RunDir(record.run_dir).read_state()
            pid = state.get("pid") or record.pid
            if (state.get("status") or record.status) == "running" and pid and process_alive(
                    pid, state.get("hostname")):
                return int(pid)
        return None

    def stop(self, run_dir: str) -> str:
        pid = self.run_pid(run_dir)
        if pid is None:
            raise LargeForgeError("this run is not running")
        os.kill(pid, signal.SIGINT)
        self.record("stop", run_key(run_dir), f"SIGINT to pid {pid}")
        return f"asked pid {pid} to stop: it saves a checkpoint after this step"

    def resume(self, run_dir: str) -> Job:
        run = RunDir(run_dir)
        if self.run_pid(run_dir) is not None:
            raise LargeForgeError("this run is still running")
        if run.latest_checkpoint() is None:
            raise LargeForgeError("this run has no checkpoint to resume from")
        argv = self._resume_argv(run)
        job = self.jobs.start("train", largeforge_argv(*argv), run_dir=str(run.path),
                              env=self._env(), cwd=self.runs_dir.parent)
        self.record("resume", run_key(run.path), " ".join(["largeforge", *argv]))
        return job

    def _resume_argv(self, run: RunDir) -> list[str]:
        """The command that launched it plus --resume, when the dashboard launched it; else its
        recipe with the run directory as the output."""
        for job in self.jobs.list("train"):
            if job.run_dir == str(run.path) and "--resume" not in job.argv:
                return [*job.argv[3:], "--resume"]
        return ["train", "--config", str(run.recipe), "--output-dir", str(run.path.parent),
                "--name", run.name, "--resume"]

    def cleanup(self, run_dir: str, keep_best: int = 1, keep_last: int = 1) -> str:
        argv = ["checkpoints", "cleanup", str(run_dir), "--keep-best", str(keep_best),
                "--keep-last", str(keep_last)]
        proc = subprocess.run(largeforge_argv(*argv), capture_output=True, text=True,
                              timeout=300, stdin=subprocess.DEVNULL,
                              env={**os.environ, **self._env()})
        if proc.returncode != 0:
            raise LargeForgeError(error_line(proc.stderr) or f"exit code {proc.returncode}")
        summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "done"
        self.record("cleanup", run_key(run_dir), summary)
        return summary

    # -- models -------------------------------------------------------------------------------

    def evaluate(self, model: str, data: str, max_examples: int, run_dir: str | None) -> Job:
        if not Path(data).is_file():
            raise LargeForgeError(f"no data file {data}")
        folder = (Path(run_dir) if run_dir else self.state_dir) / EVALS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / f"eval-{time.strftime('%Y%m%d-%H%M%S')}.json"
        argv = ["eval", "--model", model, "--data", data, "--output", str(out),
                "--max-examples", str(max_examples)]

        def table(job: Job) -> None:
            job.result = json.loads(out.read_text(encoding="utf-8"))

        job = self.jobs.start("eval", largeforge_argv(*argv), run_dir=run_dir, model=model,
                              target=str(out), then=table)
        self.record("eval", run_key(run_dir) if run_dir else None, " ".join(argv))
        return job

    def export(self, model: str, fmt: str, run_dir: str | None) -> Job:
        if fmt not in EXPORT_FORMATS:
            raise LargeForgeError(f"unknown format {fmt!r}; one of {', '.join(EXPORT_FORMATS)}")
        base = (Path(run_dir) / "exports") if run_dir else self.state_dir / "exports"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = base / (f"model-{stamp}.gguf" if fmt == "gguf" else f"{fmt}-{stamp}")
        base.mkdir(parents=True, exist_ok=True)
        argv = ["export", model, "--format", fmt, "--output", str(out)]

        def proof(job: Job) -> None:
            proc = subprocess.run(
                [sys.executable, "-m", "largeforge.dashboard.proofs", fmt, str(out), model],
                capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
            lines = proc.stdout.strip().splitlines()
            job.result = json.loads(lines[-1]) if lines else {
                "ok": False, "detail": proc.stderr.strip()[-500:]}

        job = self.jobs.start("export", largeforge_argv(*argv), run_dir=run_dir, model=model,
                              target=str(out), then=proof)
        self.record("export", run_key(run_dir) if run_dir else None, " ".join(argv))
        return job

    def serve(self, model: str, run_dir: str | None) -> Job:
        port = _free_port()
        argv = ["serve", "inference", "--model", model, "--port", str(port)]
        job = self.jobs.start("serve", largeforge_argv(*argv), run_dir=run_dir, model=model,
                              target=f"http://127.0.0.1:{port}")
        self.record("serve", run_key(run_dir) if run_dir else None, " ".join(argv))
        return job

    def stop_server(self, job_id: str) -> Job:
        job = self.jobs.stop(job_id, signal.SIGTERM)
        self.record("serve-stop", run_key(job.run_dir) if job.run_dir else None, job.target or "")
        return job


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
