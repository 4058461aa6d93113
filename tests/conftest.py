"""Shared fixtures: real data from ../shared/data, an isolated cache, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Token caches go to a per-session temp dir, never to ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "largeforge-cache"
    monkeypatch.setenv("LARGEFORGE_CACHE_DIR", str(cache))
    for name in list(os.environ):
        if name.startswith("LARGEFORGE_") and "__" in name:
            monkeypatch.delenv(name)


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
