"""The built-in corpus `builtin:python-docs`: text that every Python installation already has.

It is the interpreter's own reference documentation (`pydoc_data.topics`, the text behind
`help("topics")`) followed by the docstrings of the standard library's modules, read with `ast`
from the source files (nothing is imported, so no module runs). No download, and nothing copied
into this repository.
"""

from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

# Trees with little prose, or test data with odd content; skipped.
SKIPPED_DIRS = frozenset({
    "test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
    "dist-packages", "__pycache__", "pydoc_data", "encodings", "config-3", "venv",
})
MIN_DOCSTRING_CHARS = 80


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_version() -> str:
    """Changes when the interpreter (and so its documentation) changes."""
    digest = hashlib.sha256(f"{sys.version}|{stdlib_dir()}|{MIN_DOCSTRING_CHARS}".encode())
    digest.update(",".join(sorted(SKIPPED_DIRS)).encode())
    return digest.hexdigest()[:16]


def _topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it; the docstrings remain
        return {}
    return dict(topics)


def stdlib_files() -> list[Path]:
    root = stdlib_dir()
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if any(part in SKIPPED_DIRS or part.startswith(("config-", "test_")) for part in parts):
            continue
        files.append(path)
    return sorted(files)


def iter_python_docs() -> Iterator[str]:
    """Yield one document per reference topic, then one per stdlib module's docstrings."""
    for _name, text in sorted(_topics().items()):
        if text.strip():
            yield text.strip() + "\n"
    for path in stdlib_files():
        document = _module_docstrings(path)
        if document:
            yield document


def _module_docstrings(path: Path) -> str:
    try:
        source = path.read_text(encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules
            tree = ast.parse(source, filename=str(path))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return ""
    pieces = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                pieces.append(doc.strip())
    return "\n\n".join(pieces) + "\n" if pieces else ""
