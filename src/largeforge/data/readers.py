"""Reading the files people bring, record by record, each with where it came from.

Files: .txt/.md (and .rst/.text; documents split on `<|endoftext|>`), .json (an array, a single
record, a {column: [values]} object or {"name": [records]}), .jsonl, .csv, .parquet, directories
written by `datasets.Dataset.save_to_disk`, and hub ids when online. Every raw record keeps its
"file:line" (or "file:row N"); a JSON line that does not parse is kept as a record with an error,
so `data validate` can report it. What the records mean is `formats.py`'s business.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from largeforge.data.sources import TEXT_SUFFIXES as TEXT_FILE_SUFFIXES
from largeforge.errors import LargeForgeError
from largeforge.text_files import (
    UnusableJson,
    decode_utf8,
    describe_json_error,
    iter_json_lines,
    loads,
    may_hold_surrogates,
    string_problem,
)

RECORD_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
DOC_SEPARATOR = "<|endoftext|>"
# Fields (other than the text field) that tell a format apart; a CSV header needs one of them.
FORMAT_FIELDS = {
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "preference": ("chosen", "rejected"),
}
_SNIFF_BYTES = 8192


@dataclass
class RawRecord:
    """One record as read from a file: `data` is None when the line could not be parsed."""

    source: str  # "file:line" (or "file:row N" for Arrow data)
    data: dict[str, Any] | None
    error: str | None = None


@dataclass
class RawFile:
    """The raw records of one input file (or a save_to_disk directory, or a hub dataset)."""

    path: str
    kind: str  # "text", "json", "jsonl", "csv", "parquet", "arrow", "hub"
    records: list[RawRecord] = field(default_factory=list)
    columns: list[str] | None = None  # the header of a CSV file


def read_records(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    text_field: str = "text",
) -> list[RawFile]:
    """Every raw record of every input, with where it came from. Unreadable input (a missing or
    binary file, an unknown suffix, a whole .json file that does not parse) raises
    `LargeForgeError`; a bad line of a JSONL file is kept as a `RawRecord` with an error."""
    return [_read_file(path, kind, text_field) for path, kind in _expand(paths)]


def _expand(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
) -> list[tuple[str, str]]:
    from largeforge.data.sources import resolve_sources

    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise LargeForgeError("no data given")
    out: list[tuple[str, str]] = []
    for item in items:
        text = str(item)
        path = Path(text).expanduser()
        if path.is_dir() and is_saved_dataset(path):
            out.append((str(path), "arrow"))
            continue
        if _looks_like_hub_id(text) and not path.exists():
            out.append((text, "hub"))
            continue
        for source in resolve_sources([text]):
            if source.path is None:
                raise LargeForgeError(f"{text} is a pretraining corpus, not a record file")
            out.append((str(source.path), _file_kind(source.path)))
    return out


def is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _looks_like_hub_id(text: str) -> bool:
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text):
        return False
    return Path(text).suffix.lower() not in TEXT_FILE_SUFFIXES + RECORD_SUFFIXES


def _file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    with path.open("rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    if suffix == ".parquet":
        if not head.startswith(b"PAR1"):
            raise LargeForgeError(f"{path} is not a Parquet file (no PAR1 header)")
        return "parquet"
    if b"\0" in head:
        raise LargeForgeError(
            f"{path} is a binary file, not text; expected UTF-8 text (.txt .md .json .jsonl .csv)"
            " or .parquet"
        )
    if suffix in TEXT_FILE_SUFFIXES:
        return "text"
    if suffix in (".json", ".jsonl", ".csv"):
        return suffix[1:]
    raise LargeForgeError(
        f"{path}: unknown file type {suffix or '(no suffix)'!r}; expected one of "
        + " ".join(TEXT_FILE_SUFFIXES + RECORD_SUFFIXES)
        + " or a directory written by datasets' save_to_disk"
    )


def _read_file(path: str, kind: str, text_field: str) -> RawFile:
    if kind == "hub":
        return _read_hub(path)
    if kind == "arrow":
        return _read_arrow(path)
    if kind == "parquet":
        return _read_parquet(path)
    if kind == "jsonl":
        return _parse_jsonl(path)
    text = decode_utf8(Path(path).read_bytes(), path)  # the shared checks: BOM, bad bytes
    reader = {"text": _parse_text, "json": _parse_json, "csv": _parse_csv}
    return reader[kind](path, text, text_field)


def _parse_text(path: str, text: str, text_field: str) -> RawFile:
    out = RawFile(path, "text")
    line = 1
    for document in text.split(DOC_SEPARATOR):
        stripped = document.strip()
        if stripped:
            first = line + document[: document.index(stripped[0])].count("\n")
            out.records.append(RawRecord(f"{path}:{first}", {text_field: stripped}))
        line += document.count("\n")
    return out


def _parse_jsonl(path: str) -> RawFile:
    """Every line a record; a line that is not a JSON object, or that `text_files.loads`
    refuses (nested too deep, a lone surrogate), is kept with its error (the shared JSONL
    reader words it), so `data validate` reports it with the others."""
    out = RawFile(path, "jsonl")
    for line in iter_json_lines(path):
        if line.error is not None:
            out.records.append(RawRecord(line.where, None, line.error))
        else:
            out.records.append(_json_record(line.where, line.value))
    return out


def _parse_json(path: str, text: str, text_field: str) -> RawFile:
    """A whole JSON document; its strings are checked record by record, so a lone surrogate is
    a problem of the record that holds it (reported with the others), not of the file."""
    out = _json_records(path, _load_json_file(path, text), text, text_field)
    if may_hold_surrogates(text):
        for record in out.records:
            problem = string_problem(record.data) if record.data is not None else None
            if problem is not None:
                record.data, record.error = None, problem
    return out


def _load_json_file(path: str, text: str) -> Any:
    try:
        return loads(text, check_strings=False)
    except UnusableJson as error:
        raise LargeForgeError(f"{path}:{error.lineno}: {describe_json_error(error)}") from None
    except json.JSONDecodeError as error:
        raise LargeForgeError(
            f"{path}:{error.lineno}: {describe_json_error(error)}; a .json file must hold one "
            "JSON document (use .jsonl for one record per line)"
        ) from None


def _json_records(path: str, data: Any, text: str, text_field: str) -> RawFile:
    """The records of a parsed .json file, each with where it starts."""
    out = RawFile(path, "json")
    if isinstance(data, list):
        lines = _array_item_lines(text)
        for index, record in enumerate(data):
            where = f"{path}:{lines[index]}" if index < len(lines) else f"{path}:record {index}"
            out.records.append(_json_record(where, record))
        return out
    if not isinstance(data, dict):
        raise LargeForgeError(f"{path}: expected a JSON array or object, got {type(data).__name__}")
    columns = {k: v for k, v in data.items() if isinstance(v, list)}
    lengths = {len(v) for v in columns.values()}
    if columns and len(columns) == len(data) and len(lengths) == 1 and (
        set(data) & _known_fields(text_field)
    ):  # {"instruction": [...], "output": [...]}: a table by columns
        for index in range(lengths.pop()):
            record = {k: v[index] for k, v in data.items()}
            out.records.append(RawRecord(f"{path}:record {index}", record))
        return out
    if len(data) == 1:
        (name, value), = data.items()
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for index, record in enumerate(value):  # {"train": [records]}
                out.records.append(RawRecord(f"{path}:{name}[{index}]", record))
            return out
    out.records.append(RawRecord(f"{path}:1", data))
    return out


def _json_record(where: str, record: Any) -> RawRecord:
    if isinstance(record, dict):
        return RawRecord(where, record)
    return RawRecord(where, None, f"expected a JSON object, got {type(record).__name__}")


def _array_item_lines(text: str) -> list[int]:
    """The line on which each item of a top-level JSON array starts."""
    decoder = json.JSONDecoder()
    lines: list[int] = []
    position = text.index("[") + 1
    line = 1 + text.count("\n", 0, position)
    length = len(text)
    while True:
        while position < length and text[position] in " \t\r\n,":
            if text[position] == "\n":
                line += 1
            position += 1
        if position >= length or text[position] == "]":
            return lines
        lines.append(line)
        _, end = decoder.raw_decode(text, position)
        line += text.count("\n", position, end)
        position = end


def _known_fields(text_field: str) -> set[str]:
    known = {text_field, "prompt", "input", "system"}
    for names in FORMAT_FIELDS.values():
        known.update(names)
    return known


def _parse_csv(path: str, text: str, text_field: str) -> RawFile:
    out = RawFile(path, "csv")
    reader = csv.DictReader(text.splitlines(keepends=True))
    header = reader.fieldnames or []
    out.columns = list(header)
    identifying = {text_field, "instruction", "output", "prompt", "chosen", "rejected",
                   "conversations", "messages"}
    if not set(header) & identifying:
        raise LargeForgeError(
            f"{path}:1: the CSV header ({', '.join(header) or 'empty'}) has none of the expected "
            f"columns ({', '.join(sorted(identifying))}); set --text-field for a text column"
        )
    line = reader.line_num
    for row in reader:
        out.records.append(_csv_record(f"{path}:{line + 1}", row))
        line = reader.line_num
    return out


def _csv_record(where: str, row: dict[str | None, Any]) -> RawRecord:
    record: dict[str, Any] = {}
    for key, value in row.items():
        if key is None:  # more cells than the header has columns
            continue
        try:
            record[key] = _csv_cell(key, value)
        except UnusableJson as error:  # a JSON cell nested too deep, or with a lone surrogate
            return RawRecord(where, None, f"column {key!r}: {describe_json_error(error)}")
    return RawRecord(where, record)


def _csv_cell(key: str, value: str | None) -> Any:
    """Conversation columns hold JSON lists; everything else is text. A JSON cell `loads`
    refuses raises `UnusableJson`; one that does not parse stays text."""
    if value is None:
        return None
    if key in ("conversations", "messages", "prompt", "chosen", "rejected"):
        stripped = value.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            try:
                decoded = loads(stripped)
            except UnusableJson:
                raise
            except json.JSONDecodeError:
                return value
            if isinstance(decoded, list) and all(isinstance(v, dict) for v in decoded):
                return decoded
    return value


def _read_parquet(path: str) -> RawFile:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several kinds for a damaged file
        raise LargeForgeError(f"{path}: cannot read this Parquet file ({error})") from None
    return _from_rows(path, "parquet", _table_rows(path, table), table.column_names)


def _table_rows(path: str, table: Any) -> list[dict[str, Any]]:
    """The rows of an Arrow table; a string cell that is not UTF-8 is an error naming its row."""
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        row = next((i for i in range(table.num_rows) if not _decodes(table.slice(i, 1))), 0)
        raise LargeForgeError(
            f"{path}:row {row + 1}: a text cell is not valid UTF-8; rewrite the file with UTF-8 "
            "text, or leave the row out"
        ) from None


def _decodes(table: Any) -> bool:
    try:
        table.to_pylist()
    except UnicodeDecodeError:
        return False
    return True


def _read_arrow(path: str) -> RawFile:
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as error:
        raise LargeForgeError(f"{path}: cannot load this saved dataset ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise LargeForgeError(
                f"{path} holds the splits {', '.join(loaded)}; pass the directory of one split"
            )
        loaded = loaded["train"]
    return _from_rows(path, "arrow", loaded.to_list(), list(loaded.column_names))


def _read_hub(name: str) -> RawFile:
    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
               if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")]
    remedy = ("LargeForge needs a local file: download it where there is a network and pass the "
              "file (.jsonl .json .csv .parquet) or a save_to_disk directory")
    if offline:
        raise LargeForgeError(
            f"{name!r} is not a local file, and the Hugging Face Hub could not be reached "
            f"(offline mode: {offline[0]}=1); {remedy}"
        )
    import datasets

    try:
        loaded = datasets.load_dataset(name, split="train")
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise LargeForgeError(
            f"{name!r} is not a local file, and the hub dataset could not be reached or loaded "
            f"({reason}); {remedy}"
        ) from None
    return _from_rows(name, "hub", loaded.to_list(), list(loaded.column_names))


def _from_rows(path: str, kind: str, rows: list[dict[str, Any]], columns: list[str]) -> RawFile:
    out = RawFile(path, kind, columns=columns)
    out.records = [RawRecord(f"{path}:row {i + 1}", row) for i, row in enumerate(rows)]
    return out


