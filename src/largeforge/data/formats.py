"""Instruction, chat, preference and text data in the formats people bring, in one shape each.

Formats (detected from the records' fields, or named explicitly):

    text        {"text": ...} (or `text_field`), and plain .txt/.md files
    alpaca      instruction / input / output, optional system
    sharegpt    conversations: [{"from": human|gpt|system (or user|assistant), "value": ...}]
    messages    messages: [{"role": system|user|assistant, "content": ...}] (OpenAI style)
    preference  prompt / chosen / rejected as strings or message lists, or hh-rlhf dialogues
                ("\\n\\nHuman: ... \\n\\nAssistant: ...") whose shared prefix is the prompt

Normalised records:

    text                          {"text": str}
    alpaca, sharegpt, messages    {"messages": [{"role": ..., "content": str}, ...]}
    preference                    {"prompt": [messages], "chosen": [messages], "rejected": [...]}

Files: .txt/.md (and .rst/.text), .json (an array, a single record, a {column: [values]} object
or {"name": [records]}), .jsonl, .csv, .parquet, and directories written by
`datasets.Dataset.save_to_disk`. `read_records` gives every raw record with its "file:line"
(a bad JSON line is kept as a problem, so `data validate` can report it); `load_records` turns
files into a `datasets.Dataset` of normalised records, cached as Arrow by content.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from largeforge.errors import LargeForgeError

FORMATS = ("text", "alpaca", "sharegpt", "messages", "preference")
CHAT_FORMATS = ("alpaca", "sharegpt", "messages")
ROLES = ("system", "user", "assistant")
TEXT_FILE_SUFFIXES = (".txt", ".md", ".rst", ".text")
RECORD_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
DOC_SEPARATOR = "<|endoftext|>"
CACHE_VERSION = 1
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "bot": "assistant", "model": "assistant", "system": "system",
}
# Fields (other than the text field) that tell a format apart; a CSV header needs one of them.
FORMAT_FIELDS = {
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "preference": ("chosen", "rejected"),
}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")
_SNIFF_BYTES = 8192


class RecordProblem(Exception):
    """One record cannot be normalised; `kind` is the problem's category (see validate.py)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


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


@dataclass
class LoadedData:
    """Normalised records: `dataset` has the format's columns plus `source` ("file:line")."""

    format: str
    dataset: Any  # datasets.Dataset
    files: list[str]

    def __len__(self) -> int:
        return len(self.dataset)


# ---------------------------------------------------------------------------------------------
# Reading files


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
        if path.is_dir() and _is_saved_dataset(path):
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


def _is_saved_dataset(path: Path) -> bool:
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
    text = _read_text(Path(path))
    reader = {"text": _parse_text, "jsonl": _parse_jsonl, "json": _parse_json, "csv": _parse_csv}
    return reader[kind](path, text, text_field)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise LargeForgeError(
            f"{path}:{line}: not valid UTF-8 (bad byte at offset {error.start}); a binary file, "
            "or text in another encoding (convert it, e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


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


def _parse_jsonl(path: str, text: str, text_field: str) -> RawFile:
    out = RawFile(path, "jsonl")
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            truncated = "Unterminated" in error.msg or "Expecting" in error.msg
            hint = " (a truncated line?)" if truncated else ""
            out.records.append(
                RawRecord(where, None, f"invalid JSON: {error.msg} at column {error.colno}{hint}")
            )
            continue
        if not isinstance(record, dict):
            out.records.append(
                RawRecord(where, None, f"expected a JSON object, got {type(record).__name__}")
            )
            continue
        out.records.append(RawRecord(where, record))
    return out


def _parse_json(path: str, text: str, text_field: str) -> RawFile:
    out = RawFile(path, "json")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise LargeForgeError(
            f"{path}:{error.lineno}: invalid JSON ({error.msg} at column {error.colno}); a .json "
            "file must hold one JSON document (use .jsonl for one record per line)"
        ) from None
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
        record: dict[str, Any] = {}
        for key, value in row.items():
            if key is None:  # more cells than the header has columns
                continue
            record[key] = _csv_cell(key, value)
        out.records.append(RawRecord(f"{path}:{line + 1}", record))
        line = reader.line_num
    return out


def _csv_cell(key: str, value: str | None) -> Any:
    """Conversation columns hold JSON lists; everything else is text."""
    if value is None:
        return None
    if key in ("conversations", "messages", "prompt", "chosen", "rejected"):
        stripped = value.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            try:
                decoded = json.loads(stripped)
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
    return _from_rows(path, "parquet", table.to_pylist(), table.column_names)


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


# ---------------------------------------------------------------------------------------------
# Detection


def record_format(record: dict[str, Any], text_field: str = "text") -> str | None:
    """The format one record's fields say it is in, or None."""
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "messages"
    if "instruction" in record:
        return "alpaca"
    if text_field in record:
        return "text"
    return None


def detect_format(raw: RawFile | Iterable[RawFile], text_field: str = "text") -> str:
    """The one format of the records of these files. Records of two formats in the input (say,
    alpaca and sharegpt lines in one JSONL file) raise `LargeForgeError`, naming a line of each."""
    files = [raw] if isinstance(raw, RawFile) else list(raw)
    first_seen: dict[str, str] = {}
    fields: set[str] = set()
    for raw_file in files:
        if raw_file.kind == "text":
            first_seen.setdefault("text", raw_file.path)
            continue
        for record in raw_file.records:
            if record.data is None:
                continue
            fields.update(record.data)
            kind = record_format(record.data, text_field)
            if kind is not None:
                first_seen.setdefault(kind, record.source)
        if raw_file.columns is not None and not raw_file.records:
            kind = record_format(dict.fromkeys(raw_file.columns), text_field)
            if kind is not None:
                first_seen.setdefault(kind, raw_file.path)
    if len(first_seen) > 1:
        where = "; ".join(f"{kind} at {source}" for kind, source in first_seen.items())
        raise LargeForgeError(
            f"mixed formats in the input ({where}); one input must hold one format"
        )
    if not first_seen:
        names = ", ".join(f.path for f in files)
        raise LargeForgeError(
            f"cannot tell the format of {names}: fields {', '.join(sorted(fields)) or 'none'}; "
            f"expected {text_field!r} (text), instruction/output (alpaca), conversations "
            "(sharegpt), messages, or chosen/rejected (preference); or name it with --format"
        )
    return next(iter(first_seen))


def check_columns(raw: RawFile, fmt: str, text_field: str = "text") -> None:
    """A table (CSV, Parquet, saved dataset) must have the columns its format needs."""
    if raw.columns is None:
        return
    needed = (text_field,) if fmt == "text" else FORMAT_FIELDS[fmt]
    missing = [name for name in needed if name not in raw.columns]
    if missing:
        line = ":1" if raw.kind == "csv" else ""
        raise LargeForgeError(
            f"{raw.path}{line}: no column {', '.join(repr(m) for m in missing)} for the {fmt} "
            f"format (columns: {', '.join(raw.columns) or 'none'})"
        )


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise LargeForgeError(f"unknown format {name!r}; known: {', '.join(FORMATS)}")
    return name


# ---------------------------------------------------------------------------------------------
# Normalisation


def normalise_record(record: dict[str, Any], fmt: str, text_field: str = "text") -> dict[str, Any]:
    """The normalised shape of one record of format `fmt`; raises `RecordProblem` when the
    record's structure does not fit (a missing field, a wrong type, an unknown role)."""
    if fmt == "text":
        return {"text": _string(record, text_field)}
    if fmt == "alpaca":
        return {"messages": _alpaca(record)}
    if fmt == "sharegpt":
        return {"messages": _sharegpt(record)}
    if fmt == "messages":
        return {"messages": _messages(_field(record, "messages"), "messages")}
    if fmt == "preference":
        return _preference(record)
    raise LargeForgeError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")


def _field(record: dict[str, Any], name: str) -> Any:
    if name not in record or record[name] is None:
        present = ", ".join(sorted(str(k) for k in record)) or "none"
        raise RecordProblem("missing_field", f"missing field {name!r} (fields: {present})")
    return record[name]


def _string(record: dict[str, Any], name: str, optional: bool = False) -> str:
    if optional and record.get(name) is None:
        return ""
    value = _field(record, name)
    if not isinstance(value, str):
        raise RecordProblem("bad_field", f"field {name!r} is {type(value).__name__}, not text")
    return value


def _alpaca(record: dict[str, Any]) -> list[dict[str, str]]:
    instruction = _string(record, "instruction")
    extra = _string(record, "input", optional=True)
    output = _string(record, "output")
    system = _string(record, "system", optional=True)
    messages = [{"role": "system", "content": system}] if system.strip() else []
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": output})
    return messages


def _sharegpt(record: dict[str, Any]) -> list[dict[str, str]]:
    turns = _field(record, "conversations")
    if not isinstance(turns, list):
        raise RecordProblem("bad_field", f"'conversations' is {type(turns).__name__}, not a list")
    messages: list[dict[str, str]] = []
    system = record.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordProblem("bad_field", f"conversations[{index}] is not an object")
        for name in ("from", "value"):
            if turn.get(name) is None:
                raise RecordProblem("missing_field", f"conversations[{index}] has no {name!r}")
        speaker, value = turn["from"], turn["value"]
        role = SHAREGPT_ROLES.get(str(speaker).strip().lower())
        if role is None:
            raise RecordProblem(
                "unknown_role",
                f"conversations[{index}] is from {speaker!r}; expected human, gpt or system "
                "(or user, assistant)",
            )
        if not isinstance(value, str):
            raise RecordProblem("bad_field", f"conversations[{index}].value is not text")
        messages.append({"role": role, "content": value})
    return messages


def _messages(value: Any, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise RecordProblem("bad_field", f"{name!r} is {type(value).__name__}, not a list")
    messages: list[dict[str, str]] = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise RecordProblem("bad_field", f"{name}[{index}] is not an object")
        if message.get("role") is None:
            raise RecordProblem("missing_field", f"{name}[{index}] has no 'role'")
        role = str(message["role"]).strip().lower()
        if role not in ROLES:
            raise RecordProblem(
                "unknown_role",
                f"{name}[{index}] has role {message['role']!r}; expected system, user or assistant",
            )
        content = message.get("content")
        if content is None:
            raise RecordProblem("missing_field", f"{name}[{index}] has no 'content'")
        if not isinstance(content, str):
            raise RecordProblem("bad_field", f"{name}[{index}].content is not text")
        messages.append({"role": role, "content": content})
    return messages


def parse_hh_dialogue(text: str, name: str = "dialogue") -> list[dict[str, str]]:
    """"\\n\\nHuman: ...\\n\\nAssistant: ..." (the Anthropic hh-rlhf layout) as messages."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise RecordProblem(
            "bad_field", f"{name!r} has text before its first '\\n\\nHuman:' or 'Assistant:' turn"
        )
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        role = "user" if speaker == "Human" else "assistant"
        messages.append({"role": role, "content": content.strip()})
    return messages


def _preference(record: dict[str, Any]) -> dict[str, Any]:
    chosen_raw, rejected_raw = _field(record, "chosen"), _field(record, "rejected")
    prompt_raw = record.get("prompt")
    if prompt_raw is None:
        chosen = _dialogue(chosen_raw, "chosen")
        rejected = _dialogue(rejected_raw, "rejected")
        if not chosen or not rejected:
            raise RecordProblem(
                "missing_field",
                "missing field 'prompt', and 'chosen'/'rejected' are not whole dialogues",
            )
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        # The prompt ends on the last user turn of the shared prefix.
        cut = max((i + 1 for i in range(shared) if chosen[i]["role"] == "user"), default=0)
        return {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}
    if isinstance(prompt_raw, str):
        prompt = [{"role": "user", "content": prompt_raw}]
    else:
        prompt = _messages(prompt_raw, "prompt")
    return {
        "prompt": prompt,
        "chosen": _completion(chosen_raw, "chosen", prompt),
        "rejected": _completion(rejected_raw, "rejected", prompt),
    }


def _dialogue(value: Any, name: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return parse_hh_dialogue(value, name) if _HH_TURN.search(value) else []
    return _messages(value, name)


def _completion(value: Any, name: str, prompt: list[dict[str, str]]) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    messages = _messages(value, name)
    if len(messages) > len(prompt) and messages[: len(prompt)] == prompt:
        return messages[len(prompt):]  # the whole conversation, prompt included
    return messages


# ---------------------------------------------------------------------------------------------
# Loading through `datasets`


def _features(fmt: str) -> Any:
    from datasets import Features, Value

    message = [{"role": Value("string"), "content": Value("string")}]
    columns: dict[str, Any]
    if fmt == "text":
        columns = {"text": Value("string")}
    elif fmt == "preference":
        columns = {"prompt": message, "chosen": message, "rejected": message}
    else:
        columns = {"messages": message}
    return Features({**columns, "source": Value("string"), "_error": Value("string")})


def _normalise_batch(batch: dict[str, list[Any]], fmt: str, text_field: str) -> dict[str, list]:
    empty = _empty_record(fmt)
    out: dict[str, list[Any]] = {name: [] for name in (*empty, "source", "_error")}
    for raw, source in zip(batch["_raw"], batch["source"], strict=True):
        try:
            record, error = normalise_record(json.loads(raw), fmt, text_field), None
        except RecordProblem as problem:
            record, error = empty, f"{source}: {problem.message}"
        for name, value in record.items():
            out[name].append(value)
        out["source"].append(source)
        out["_error"].append(error)
    return out


def _empty_record(fmt: str) -> dict[str, Any]:
    if fmt == "text":
        return {"text": ""}
    if fmt == "preference":
        return {"prompt": [], "chosen": [], "rejected": []}
    return {"messages": []}


def load_records(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    format: str | None = None,
    *,
    text_field: str = "text",
    num_proc: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> LoadedData:
    """Read files (or a save_to_disk directory, or a hub id when online), detect or check the
    format, and normalise every record with a batched `datasets` map (`num_proc` processes).

    The result is cached as Arrow under the LargeForge cache (`cache_dir`, $LARGEFORGE_CACHE_DIR,
    ~/.cache/largeforge) by the content of the inputs, so a second load maps nothing. A record that
    cannot be normalised raises `LargeForgeError` naming its file:line (run `largeforge data
    validate` to see every problem)."""
    import datasets

    from largeforge.data.pretrain import cache_root

    if format is not None:
        check_format(format)
    expanded = _expand(paths)
    key = _cache_key(expanded, format, text_field)
    root = cache_root(cache_dir) / "records"
    entry = root / key
    meta_path = entry / "largeforge.json"
    files = [path for path, _ in expanded]
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return LoadedData(meta["format"], datasets.load_from_disk(str(entry / "data")), files)

    raw_files = [_read_file(path, kind, text_field) for path, kind in expanded]
    fmt = format or detect_format(raw_files, text_field)
    for raw_file in raw_files:
        check_columns(raw_file, fmt, text_field)
    sources: list[str] = []
    raws: list[str] = []
    for raw_file in raw_files:
        for record in raw_file.records:
            if record.data is None:
                raise LargeForgeError(
                    f"{record.source}: {record.error}; run `largeforge data validate` to see "
                    "every problem, and --output to keep only the valid records"
                )
            sources.append(record.source)
            raws.append(json.dumps(record.data, ensure_ascii=False, default=str))
    if not raws:
        raise LargeForgeError(f"no records in {', '.join(files)}")
    table = datasets.Dataset.from_dict({"_raw": raws, "source": sources})
    with _quiet_datasets():
        mapped = table.map(
            _normalise_batch, batched=True, batch_size=1000,
            num_proc=num_proc if num_proc and num_proc > 1 and len(raws) > 1 else None,
            fn_kwargs={"fmt": fmt, "text_field": text_field},
            remove_columns=["_raw", "source"], features=_features(fmt),
            desc=f"normalising {fmt} records",
        )
    errors = [e for e in mapped["_error"] if e]
    if errors:
        shown = "; ".join(errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise LargeForgeError(
            f"{len(errors)} record(s) do not fit the {fmt} format: {shown}{more}; run "
            "`largeforge data validate` to see every problem"
        )
    mapped = mapped.remove_columns("_error")
    if any(kind == "hub" for _, kind in expanded):  # the hub copy may change: not cached by us
        return LoadedData(fmt, mapped, files)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        with _quiet_datasets():
            mapped.save_to_disk(str(staging / "data"))
        (staging / "largeforge.json").write_text(json.dumps({"format": fmt, "files": files}))
        try:
            staging.rename(entry)
        except OSError:  # another process built the same entry first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return LoadedData(fmt, datasets.load_from_disk(str(entry / "data")), files)


class _quiet_datasets:  # noqa: N801 - used as a context manager
    """datasets draws a progress bar for each map; LargeForge's commands print their own."""

    def __enter__(self) -> None:
        import datasets

        self._was = datasets.utils.logging.is_progress_bar_enabled()
        datasets.utils.logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        import datasets

        if self._was:
            datasets.utils.logging.enable_progress_bar()


def _cache_key(expanded: list[tuple[str, str]], fmt: str | None, text_field: str) -> str:
    digest = hashlib.sha256(
        json.dumps([CACHE_VERSION, fmt, text_field]).encode()
    )
    for path, kind in expanded:
        digest.update(b"\0" + kind.encode() + b"\0")
        if kind == "hub":
            digest.update(path.encode())
            continue
        location = Path(path)
        files = sorted(p for p in location.rglob("*") if p.is_file()) if location.is_dir() \
            else [location]
        for file in files:
            digest.update(file.name.encode() + b"\0")
            with file.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()[:24]
