"""Reading the text files users hand us: YAML mappings (recipes, router configs) and JSONL (data,
prompts, labelled prompts), with errors that name the file and the line.

A leaf module: it imports nothing of LargeForge but `errors`, so every layer may use it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from largeforge.errors import LargeForgeError


def read_text(path: str | Path, what: str, *, expected: str = "") -> str:
    """The file's UTF-8 text; a missing file or one that is not UTF-8 is a `LargeForgeError`
    that says what the file was for (`what`, e.g. "recipe file")."""
    path = Path(path)
    if not path.is_file():
        raise LargeForgeError(f"{what} {path} not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        hint = f", expected {expected}" if expected else ""
        raise LargeForgeError(f"{what} {path} is not UTF-8 text ({exc.reason}{hint})") from None


def read_yaml_mapping(path: str | Path, what: str, *, of: str = "keys") -> Mapping[str, Any]:
    """A YAML file that must hold a mapping (`a {what} must be a mapping of {of}`); a syntax
    error names `file:line`."""
    path = Path(path)
    text = read_text(path, what)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise LargeForgeError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        raise LargeForgeError(f"{what} {path} is empty")
    if not isinstance(data, Mapping):
        raise LargeForgeError(f"{path}: a {what.removesuffix(' file')} must be a mapping of {of}")
    return data


@dataclass(frozen=True)
class JsonLine:
    """One non-blank line of a JSONL file: its value, or why it is not JSON."""

    where: str  # "file:line"
    number: int  # 1-based line number
    value: Any = None
    error: str | None = None  # "invalid JSON: ... at column N", when the line does not parse

    def object(self) -> dict[str, Any]:
        """The line's JSON object; a line that is not one is a `LargeForgeError` naming it."""
        if self.error is not None:
            raise LargeForgeError(f"{self.where}: {self.error}")
        if not isinstance(self.value, dict):
            raise LargeForgeError(
                f"{self.where}: expected a JSON object, got {type(self.value).__name__}")
        return self.value


def json_lines(text: str, source: str | Path) -> Iterator[JsonLine]:
    """Each non-blank line of JSONL `text` read from `source`, parsed or with its error: the
    caller decides whether a bad line stops the read or is reported with the others."""
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            truncated = "Unterminated" in exc.msg or "Expecting" in exc.msg
            hint = " (a truncated line?)" if truncated else ""
            yield JsonLine(where, number, error=f"invalid JSON: {exc.msg} at column "
                                                f"{exc.colno}{hint}")
            continue
        yield JsonLine(where, number, value)


def read_json_lines(path: str | Path, what: str) -> Iterator[JsonLine]:
    """`json_lines` of a JSONL file that must exist and be UTF-8 text."""
    return json_lines(read_text(path, what, expected="JSONL"), path)
