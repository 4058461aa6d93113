"""Reading the text files users hand us: YAML mappings (recipes, router configs), JSON and JSONL
(data, prompts, labelled prompts), with errors that name the file and the line.

One set of checks for every reader of user text, so every command takes or refuses the same
input: a UTF-8 byte-order mark at the start of a file is dropped; a byte that is not UTF-8 is an
error naming `file:line`; JSON nested deeper than `MAX_JSON_DEPTH` levels, or holding a string
that is not Unicode text (a lone surrogate, `"\\ud800"`, which UTF-8 and so every tokenizer
refuses), is refused as `UnusableJson`, a `json.JSONDecodeError` with its line and column.

A leaf module: it imports nothing of LargeForge but `errors`, so every layer may use it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from largeforge.errors import LargeForgeError

BOM = "\ufeff"
# Deeper than any record needs; far below the interpreter's recursion limit, so no reader, no
# `json.dumps` and no validator ever recurses out of stack on what passed.
MAX_JSON_DEPTH = 100
SURROGATE_REMEDY = ("not Unicode text, which no tokenizer can encode; remove it, or write the "
                    "whole character (a surrogate pair)")
_STRUCTURE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
_SURROGATE_ESCAPE = re.compile(r"(\\+)u([dD][89a-fA-F][0-9a-fA-F]{2})")
_LOW_ESCAPE = re.compile(r"\\u[dD][c-fC-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


class UnusableJson(json.JSONDecodeError):
    """JSON no command can use: nested too deep, or a string that is not Unicode text. `msg`
    is whole (it names the column); `path` names the string at fault (`messages[0].content`)."""

    def __init__(self, msg: str, doc: str, pos: int, path: str | None = None) -> None:
        super().__init__(msg, doc, pos)
        self.path = path


def decode_utf8(raw: bytes, source: str | Path, *, offset: int = 0, line: int = 1) -> str:
    """`raw`, the bytes at `offset` of file `source` (starting on line `line`), as text; a BOM
    at the start of the file is dropped. A byte that is not UTF-8 is a `LargeForgeError` that
    names `file:line` and the byte's offset in the file."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        where = line + raw[: error.start].count(b"\n")
        raise LargeForgeError(
            f"{source}:{where}: not valid UTF-8 (bad byte at offset {offset + error.start}); a "
            "binary file, or text in another encoding: convert it, e.g. `iconv -f latin1 -t "
            "utf-8`"
        ) from None
    return text.removeprefix(BOM) if offset == 0 else text


def read_text(path: str | Path, what: str) -> str:
    """The file's UTF-8 text (see `decode_utf8`); a missing file is a `LargeForgeError` that
    says what the file was for (`what`, e.g. "recipe file")."""
    path = Path(path)
    if not path.is_file():
        raise LargeForgeError(f"{what} {path} not found")
    return decode_utf8(path.read_bytes(), path)


def loads(text: str, *, check_strings: bool = True) -> Any:
    """`json.loads` for JSON a user gave: bad syntax raises `json.JSONDecodeError` as ever, and
    what parses but no command can use raises `UnusableJson` (a subclass): nesting deeper than
    `MAX_JSON_DEPTH` (checked first, so `[` * 100000 never recurses), and, unless
    `check_strings` is False (the caller checks each record with `string_problem`), a string or
    key holding a lone surrogate."""
    deep = _too_deep_at(text)
    if deep is not None:
        raise UnusableJson(_with_column(f"JSON nested more than {MAX_JSON_DEPTH} levels deep",
                                        text, deep) + "; flatten the record or leave it out",
                           text, deep)
    value = json.loads(text)
    if check_strings and may_hold_surrogates(text):
        found = _lone_surrogate(value)
        if found is not None:
            path, where, escape = found
            position = _lone_escape_at(text)
            at = _with_column(f"lone surrogate {escape}", text, position)
            raise UnusableJson(f"{at} ({where}): {SURROGATE_REMEDY}", text, position, path)
    return value


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities (a diverged loss) as None, since JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def string_problem(value: Any) -> str | None:
    """Why `value` (a record, as decoded or held in memory) cannot be encoded as UTF-8 text: a
    lone surrogate in one of its strings or keys, named by where it is; None when it can."""
    found = _lone_surrogate(value)
    if found is None:
        return None
    _, where, escape = found
    return f"lone surrogate {escape} ({where}): {SURROGATE_REMEDY}"


def may_hold_surrogates(text: str) -> bool:
    """Whether JSON `text` has any `\\uD800`-`\\uDFFF` escape: only then may a value decoded
    from it hold a lone surrogate, so only then need its records go through `string_problem`."""
    return _SURROGATE_ESCAPE.search(text) is not None


def describe_json_error(error: json.JSONDecodeError) -> str:
    """One phrase for why JSON text was refused, with its column (the caller adds file:line)."""
    if isinstance(error, UnusableJson):
        return error.msg
    truncated = "Unterminated" in error.msg or "Expecting" in error.msg
    hint = " (a truncated line?)" if truncated else ""
    return f"invalid JSON: {error.msg} at column {error.colno}{hint}"


def _with_column(what: str, text: str, position: int) -> str:
    column = position - text.rfind("\n", 0, position)
    return f"{what} at column {column}"


def _too_deep_at(text: str) -> int | None:
    """Where the JSON `text` first opens more than MAX_JSON_DEPTH arrays or objects, or None."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return None
    depth = 0
    for match in _STRUCTURE.finditer(text):
        char = text[match.start()]
        if char in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return match.start()
        elif char in "]}":
            depth -= 1
    return None


def _lone_escape_at(text: str) -> int:
    """Where the first `\\uD800`-`\\uDFFF` escape that is not half of a pair starts."""
    low_of_pair = -1
    for match in _SURROGATE_ESCAPE.finditer(text):
        if len(match.group(1)) % 2 == 0:
            continue  # an escaped backslash followed by the letters "u d8..": text
        start = match.end(1) - 1
        if start == low_of_pair:
            continue
        if int(match.group(2), 16) < 0xDC00 and _LOW_ESCAPE.match(text, match.end()):
            low_of_pair = match.end()
            continue
        return start
    return 0


def _lone_surrogate(value: Any) -> tuple[str | None, str, str] | None:
    """(its path, where in words, its escape) for the first string or key of `value` holding a
    lone surrogate: ("messages[0].content", "in the string at messages[0].content", "\\ud800").
    Walked without recursion: a value held in memory may be nested any depth."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            match = _SURROGATE.search(item)
            if match:
                where = f"in the string at {path}" if path else "in the string"
                return path or None, where, _escape(match)
        elif isinstance(item, Mapping):
            for key in item:
                match = _SURROGATE.search(key) if isinstance(key, str) else None
                if match:
                    where = f"in the key '{_printable(key)}' of {path or 'the record'}"
                    return path or None, where, _escape(match)
            stack.extend((f"{path}.{_printable(key)}" if path else _printable(key), child)
                         for key, child in reversed(list(item.items())))
        elif isinstance(item, (list, tuple)):
            stack.extend((f"{path}[{i}]", item[i]) for i in reversed(range(len(item))))
    return None


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _printable(key: Any) -> str:
    """A key as a message can show it: a lone surrogate as its escape, never raw."""
    return str(key).encode("utf-8", "backslashreplace").decode("utf-8")


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
    """One non-blank line of a JSONL file: its value, or why it cannot be used."""

    where: str  # "file:line"
    number: int  # 1-based line number
    value: Any = None
    # "invalid JSON: ... at column N", or what `loads` refuses (nesting, a lone surrogate)
    error: str | None = None

    def object(self) -> dict[str, Any]:
        """The line's JSON object; a line that is not one is a `LargeForgeError` naming it."""
        if self.error is not None:
            raise LargeForgeError(f"{self.where}: {self.error}")
        if not isinstance(self.value, dict):
            raise LargeForgeError(
                f"{self.where}: expected a JSON object, got {type(self.value).__name__}")
        return self.value


def json_line(line: str, source: str | Path, number: int) -> JsonLine | None:
    """Line `number` of a JSONL file `source`, parsed by `loads` or with its error; None when
    blank."""
    if not line.strip():
        return None
    where = f"{source}:{number}"
    try:
        return JsonLine(where, number, loads(line))
    except json.JSONDecodeError as exc:
        return JsonLine(where, number, error=describe_json_error(exc))


def json_lines(text: str, source: str | Path) -> Iterator[JsonLine]:
    """Each non-blank line of JSONL `text` read from `source`, parsed or with its error: the
    caller decides whether a bad line stops the read or is reported with the others."""
    for number, line in enumerate(text.removeprefix(BOM).split("\n"), start=1):
        parsed = json_line(line, source, number)
        if parsed is not None:
            yield parsed


def iter_json_lines(path: str | Path) -> Iterator[JsonLine]:
    """`json_lines` of a JSONL file, read a line at a time (never whole, for corpora larger
    than memory); a byte that is not UTF-8 is a `LargeForgeError` naming `file:line`."""
    offset = 0
    with Path(path).open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = decode_utf8(raw, path, offset=offset, line=number)
            offset += len(raw)
            parsed = json_line(line, path, number)
            if parsed is not None:
                yield parsed


def read_json_lines(path: str | Path, what: str) -> Iterator[JsonLine]:
    """`iter_json_lines` of a JSONL file that must exist (checked now, not when first read)."""
    if not Path(path).is_file():
        raise LargeForgeError(f"{what} {path} not found")
    return iter_json_lines(path)
