"""The house rules of docs/architecture.md, read from the source: the layers and what each may
import, no import cycles (imports inside functions count), and no module or function too long
to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# The layers of docs/architecture.md, bottom up: a module may import its own layer and the
# layers before it.
LAYERS: list[set[str]] = [
    {"errors", "atomic_files", "text_files", "cache_paths", "chat_templates", "hardware",
     "staging", "ollama_templates", "quickstart_corpus", "version", "damaged_files"},
    {"sources"},
    {"runs"},
    {"adapters"},
    {"models"},
    {"config"},
    {"tokenizer"},
    {"inference"},
    {"data"},
    {"training"},
    {"evaluation"},
    {"export"},
    {"serving"},
    {"merge", "server", "trainer", "quickstart"},
    {"cli", "dashboard"},
    {"__init__", "__main__"},
]
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 150


def _modules() -> dict[str, Path]:
    modules = {}
    for path in (SRC / "largeforge").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every largeforge module `path` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n in MODULES)
    return found


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for index, layer in enumerate(LAYERS):
        if top in layer:
            return index
    raise AssertionError(f"{module} is in no layer of docs/architecture.md")


def test_every_import_goes_down_the_layers() -> None:
    upward = [f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
              if _layer(b) > _layer(a)]
    assert not upward, "imports up the layers:\n" + "\n".join(sorted(upward))


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert _cycles() == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_and_functions_are_short(module: str) -> None:
    text = MODULES[module].read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{module} is over {MAX_MODULE_LINES} lines"
    long = [f"{node.name}: {node.end_lineno - node.lineno + 1} lines"  # type: ignore[operator]
            for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]  # type: ignore[operator]
    assert not long, f"{module}: {long}"
