"""Atomic file writes, without importing torch (reports and registry tools use them too)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_atomic_text(path: Path, text: str) -> None:
    """Replace `path` with `text` so readers see the old or the new content, never a mix.

    The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600:
    reports, recipes and run state are meant to be read by others.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
