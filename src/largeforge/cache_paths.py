"""Where LargeForge keeps what it can make again: token shards, imported models, content-addressed
copies of models given as objects. Torch-free, so any module can ask without importing more."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $LARGEFORGE_CACHE_DIR, else ~/.cache/largeforge."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LARGEFORGE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "largeforge"
