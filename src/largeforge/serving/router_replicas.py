"""The expert servers the router starts itself: `largeforge serve inference` on loopback for each
expert that names a model and a number of `replicas`.

They are child processes of the router: started before it serves, waited for until their
`/health` answers, stopped when it stops, and (Linux) sent SIGTERM by the kernel when the router
dies, so no server outlives it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from largeforge.errors import LargeForgeError
from largeforge.serving.auth import API_KEYS_ENV
from largeforge.serving.router_config import RouterConfig


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the replica gets SIGTERM when the router dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalReplicas:
    """`largeforge serve inference` servers on loopback for the experts that name a model and a
    number of `replicas`; their logs go to `log_dir` (a new temporary directory by default).
    A context manager: the servers are stopped on exit."""

    def __init__(self, config: RouterConfig, log_dir: str | Path | None = None,
                 *, host: str = "127.0.0.1") -> None:
        self.config = config
        self.host = host
        self.log_dir = Path(log_dir) if log_dir else None
        self.urls: dict[str, list[str]] = {}
        self.processes: list[tuple[str, subprocess.Popen, Path]] = []

    def __enter__(self) -> LocalReplicas:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start every replica, then wait until all answer (all start at once: loading models
        in parallel is what makes a router with several experts start in reasonable time)."""
        wanted = [(s.name, s.record.model, i) for s in self.config.experts
                  for i in range(s.record.replicas)]
        if not wanted:
            return
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="largeforge-router-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        pending: list[tuple[str, str, subprocess.Popen, Path]] = []
        # The router's own keys are not the replicas': they listen on loopback, keyless.
        env = {k: v for k, v in os.environ.items() if k != API_KEYS_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        for name, model, index in wanted:
            port = free_port(self.host)
            url = f"http://{self.host}:{port}"
            log_file = self.log_dir / f"{name}-{index}.log"
            command = [sys.executable, "-m", "largeforge.cli.main", "serve", "inference",
                       "--model", str(model), "--host", self.host, "--port", str(port),
                       "--served-model-name", name]
            with open(log_file, "wb") as out:
                proc = subprocess.Popen(
                    command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=env,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )
            self.processes.append((name, proc, log_file))
            pending.append((name, url, proc, log_file))
        deadline = time.monotonic() + self.config.upstream.startup_timeout
        for name, url, proc, log_file in pending:
            _wait_ready(name, url, proc, log_file, deadline)
            self.urls.setdefault(name, []).append(url)

    def stop(self) -> None:
        """SIGTERM every replica, then SIGKILL those still running after 15 s."""
        for _, proc, _ in self.processes:
            if proc.poll() is None:
                proc.terminate()
        for _, proc, _ in self.processes:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()


def _wait_ready(name: str, url: str, proc: subprocess.Popen, log_file: Path,
                deadline: float) -> None:
    """Until `url/health` answers 200; a server that exits first is an error quoting the last
    line of its log (usually the reason)."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_file.read_text(encoding="utf-8", errors="replace").strip()
            tail = tail.splitlines()[-1] if tail else "no output"
            raise LargeForgeError(
                f"the server for expert {name!r} exited with code {proc.returncode} before it "
                f"was ready: {tail} (log: {log_file})"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        time.sleep(0.2)
    raise LargeForgeError(f"the server for expert {name!r} was not ready after the startup "
                          f"timeout (upstream.startup_timeout); log: {log_file}")
