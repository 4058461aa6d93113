"""Atomic file writes, without importing torch (reports and registry tools use them too).

Every output is written under a temporary name beside it, `.NAME.tmp-XXXXXXXX`, and renamed
into place when complete. The writing process holds an advisory lock (`flock`) on its temporary
file or directory for as long as it exists, and removes it on any failure (an exception, a
KeyboardInterrupt). A process killed outright (SIGKILL, a power cut) cannot clean up, and its
lock dies with it: the next writer of the same output finds the leftover unlocked and removes
it before it starts (`sweep_stale`), so a killed command never blocks the next one and its
leftovers do not stay forever. A temporary that is locked belongs to a live writer and is left
alone.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: leftovers are ignored, never swept
    fcntl = None  # type: ignore[assignment]

TEMP_TAG = ".tmp-"  # `.NAME.tmp-XXXXXXXX`: the temporary of output NAME


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def temp_prefix(name: str) -> str:
    """The prefix of every temporary of the output called `name`."""
    return f".{name}{TEMP_TAG}"


def is_temp_name(name: str) -> bool:
    """Whether a directory entry is a temporary of some output (ours, by its name)."""
    return name.startswith(".") and TEMP_TAG in name[1:]


def write_atomic_text(path: Path, text: str) -> None:
    """Replace `path` with `text` so readers see the old or the new content, never a mix.

    The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600:
    reports, recipes and run state are meant to be read by others.
    """
    with temp_file(path) as tmp:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


@contextlib.contextmanager
def temp_file(target: Path, suffix: str = "") -> Iterator[Path]:
    """A new, empty, locked temporary file beside `target`, for the caller to fill and rename
    onto `target`; removed on exit if it is still there. Stale leftovers of killed writers of
    `target` are removed first; parent directories this creates are removed again on failure
    when they are still empty."""
    with _temp(Path(target), directory=False, suffix=suffix) as path:
        yield path


@contextlib.contextmanager
def temp_dir(target: Path) -> Iterator[Path]:
    """A new, empty, locked temporary directory beside `target` (see `temp_file`)."""
    with _temp(Path(target), directory=True) as path:
        yield path


@contextlib.contextmanager
def _temp(target: Path, *, directory: bool, suffix: str = "") -> Iterator[Path]:
    created = make_parents(target.parent)
    try:
        sweep_stale(target)
        path, lock = _create_locked(target, directory=directory, suffix=suffix)
        try:
            yield path
        finally:
            try:
                _remove(path)  # still there: not renamed into place, so a failure
            finally:
                os.close(lock)
    except BaseException:
        remove_empty_dirs(created)
        raise


def _create_locked(target: Path, *, directory: bool, suffix: str) -> tuple[Path, int]:
    """(path, locked descriptor) of a new temporary. Locked right after it is created; should
    a sweeper have removed it in between, another is made."""
    prefix = temp_prefix(target.name)
    while True:
        if directory:
            path = Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix, suffix=suffix))
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
        else:
            fd, name = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=suffix)
            path = Path(name)
        _lock(fd, wait=True)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                # The usual permissions, not mkstemp's private ones: it becomes the output.
                os.chmod(path, (0o777 if directory else 0o666) & ~_umask())
                return path, fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _lock(fd: int, *, wait: bool) -> bool:
    """Take the exclusive lock on `fd`; False when another holder has it (wait=False). On a
    file system without locks a writer goes on unlocked and nothing is ever taken for stale."""
    if fcntl is None:  # pragma: no cover - no locks: nothing is ever swept
        return wait
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:
        return wait
    return True


def lock_path(path: Path) -> int | None:
    """Take an exclusive lock on `path` (a file or directory), held until the returned
    descriptor is closed or the process ends, however; None when another holder has it."""
    fd = os.open(path, os.O_RDONLY)
    if _lock(fd, wait=False):
        return fd
    os.close(fd)
    return None


def locked_elsewhere(path: Path) -> bool:
    """Whether another process (or another descriptor of this one) holds `path`'s exclusive
    lock (`lock_path`). Asked with a shared lock, so that processes asking at once (the ranks
    of one run starting together) never take each other for the holder."""
    if fcntl is None:  # pragma: no cover
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # a file system without locks: nothing can be told
        return False
    finally:
        os.close(fd)
    return False


def sweep_stale(target: Path) -> list[Path]:
    """Remove the temporaries of `target` that no live process holds (leftovers of a writer
    that was killed); returns what was removed. Those of live writers are left alone."""
    target = Path(target)
    prefix = temp_prefix(target.name)
    try:
        names = [entry.name for entry in os.scandir(target.parent)]
    except OSError:
        return []
    return [p for p in (target.parent / n for n in names if n.startswith(prefix))
            if _remove_if_stale(p)]


def sweep_stale_in(directory: Path) -> list[Path]:
    """`sweep_stale` for every temporary in `directory`, whatever output it was for."""
    try:
        names = [entry.name for entry in os.scandir(directory)]
    except OSError:
        return []
    return [p for p in (Path(directory) / n for n in names if is_temp_name(n))
            if _remove_if_stale(p)]


def _remove_if_stale(path: Path) -> bool:
    if fcntl is None or path.is_symlink():  # pragma: no cover - never followed
        return False
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        if not _lock(fd, wait=False):
            return False  # a live writer holds it
        _remove(path)
        return True
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def honour_umask(path: Path) -> None:
    """Give `path` and everything under it the usual modes: 0666 (0777 for directories and
    executables) less the umask. Libraries write private files (safetensors 0600, `tempfile`
    0700 directories), which other users and a serving container could not read."""
    umask = _umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if item.is_symlink():
            continue
        mode = item.stat().st_mode
        full = 0o777 if item.is_dir() or mode & 0o100 else 0o666
        if mode & 0o7777 != full & ~umask:
            os.chmod(item, full & ~umask)


def replace_path(src: Path, dst: Path) -> None:
    """Rename `src` (a complete file or directory) onto `dst`, whatever `dst` holds: an old
    `dst` is first renamed to a temporary name beside it and removed after, so `dst` is never
    half old, half new (a writer killed in between leaves the old one to `sweep_stale`). What
    is published gets the modes the umask allows (`honour_umask`)."""
    honour_umask(src)
    if not dst.exists() and not dst.is_symlink():
        os.replace(src, dst)
        return
    old = dst.with_name(f"{temp_prefix(dst.name)}old-{secrets.token_hex(4)}")
    os.replace(dst, old)
    os.replace(src, dst)
    _remove(old)


def make_parents(directory: Path) -> list[Path]:
    """Create `directory` and its missing parents; returns those created, deepest first."""
    missing: list[Path] = []
    current = Path(directory)
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    Path(directory).mkdir(parents=True, exist_ok=True)
    return missing


def remove_empty_dirs(directories: list[Path]) -> None:
    """Remove the directories `make_parents` created, deepest first, while they are empty."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return
