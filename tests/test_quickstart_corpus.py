"""The built-in corpus `builtin:python-docs`: Python's own docs, read without importing."""

from __future__ import annotations

import subprocess
import sys

import pytest

import largeforge.quickstart_corpus as qc
from largeforge.data.sources import iter_documents, resolve_sources


@pytest.fixture(scope="module")
def read_paths():
    """Documents of one full pass, and every file whose docstrings were read."""
    seen = []
    original = qc._module_docstrings

    def spy(path):
        seen.append(path)
        return original(path)

    qc._module_docstrings = spy
    try:
        documents = list(qc.iter_python_docs())
    finally:
        qc._module_docstrings = original
    return documents, seen


def test_documents_are_non_empty_and_large(read_paths):
    documents, _ = read_paths
    assert len(documents) > 100
    assert all(d.strip() and d.endswith("\n") for d in documents)
    assert sum(len(d) for d in documents) > 500_000


def test_topics_come_first():
    from pydoc_data.topics import topics

    documents = qc.iter_python_docs()
    names = sorted(name for name, text in topics.items() if text.strip())
    for name in names[:5]:
        assert next(documents) == topics[name].strip() + "\n"


def test_then_stdlib_docstrings(read_paths):
    documents, seen = read_paths
    joined = "".join(documents)
    assert "Assert statements are a convenient way" in joined  # a reference topic
    # a well-known module docstring, read from the source file
    json_init = qc.stdlib_dir() / "json" / "__init__.py"
    assert json_init in seen
    assert "JSON (JavaScript Object Notation)" in joined


def test_skipped_dirs_are_never_read(read_paths):
    _, seen = read_paths
    root = qc.stdlib_dir()
    assert seen == qc.stdlib_files()
    assert len(seen) > 100
    for path in seen:
        parts = path.relative_to(root).parts
        assert not set(parts) & qc.SKIPPED_DIRS, path
        assert not any(p.startswith(("test_", "config-")) for p in parts), path
        assert path.suffix == ".py"
    names = {path.relative_to(root).parts[0] for path in seen}
    for skipped in ("tkinter", "test", "idlelib", "lib2to3", "encodings"):
        assert skipped not in names
    if (root / "tkinter").is_dir():  # the tree exists, and is still left out
        assert not any("tkinter" in p.parts for p in seen)


def test_nothing_is_imported():
    # In a fresh interpreter, after warming up what the reader itself uses (sysconfig's data,
    # `inspect` behind ast.get_docstring), a full pass imports no module but the topics table.
    code = (
        "import ast, sys\n"
        "from largeforge.quickstart_corpus import iter_python_docs, stdlib_files\n"
        "stdlib_files()\n"
        "ast.get_docstring(ast.parse('\"\"\"doc\"\"\"'))\n"
        "before = set(sys.modules)\n"
        "n = sum(1 for _ in iter_python_docs())\n"
        "print(n, *sorted(set(sys.modules) - before))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    count, *new_modules = proc.stdout.split()
    assert int(count) > 100
    assert set(new_modules) <= {"pydoc_data", "pydoc_data.topics"}, new_modules


def test_nothing_is_imported_in_process(read_paths):
    assert "antigravity" not in sys.modules and "this" not in sys.modules
    assert "tkinter" not in sys.modules


def test_corpus_version_is_stable():
    assert qc.corpus_version() == qc.corpus_version()
    assert len(qc.corpus_version()) == 16


def test_through_iter_documents():
    stats = {}
    documents = iter_documents(resolve_sources(["builtin:python-docs"]), stats=stats)
    first = [next(documents) for _ in range(3)]
    assert all(first)
    assert stats["files"] == 1 and stats["documents"] == 3


def test_module_docstrings_of_a_file(tmp_path):
    long = "A docstring long enough to be kept, " * 3
    source = (
        f'"""{long}"""\n'
        '"""not a docstring"""\n'
        "def short():\n    'too short'\n"
        f"class Kept:\n    '''{long} class'''\n"
        f"    async def method(self):\n        '''{long} method'''\n"
        "raise SystemExit('never executed')\n"
    )
    path = tmp_path / "mod.py"
    path.write_text(source, encoding="utf-8")
    text = qc._module_docstrings(path)
    assert text.count("A docstring long enough") == 9
    assert "too short" not in text and "not a docstring" not in text
    broken = tmp_path / "broken.py"
    broken.write_text("def (:\n", encoding="utf-8")
    assert qc._module_docstrings(broken) == ""
