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
`datasets.Dataset.save_to_disk` are read by `readers.py` (`read_records` gives every raw record
with its "file:line"); here the records are detected and normalised, and `load_records` turns
files into a `datasets.Dataset` of normalised records, cached as Arrow by content.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from largeforge.data.readers import FORMAT_FIELDS, RawFile, _expand, _read_file
from largeforge.data.readers import read_records as read_records  # part of this module's API
from largeforge.errors import LargeForgeError

FORMATS = ("text", "alpaca", "sharegpt", "messages", "preference")
CHAT_FORMATS = ("alpaca", "sharegpt", "messages")
ROLES = ("system", "user", "assistant")
CACHE_VERSION = 1
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "bot": "assistant", "model": "assistant", "system": "system",
}
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")


class RecordProblem(Exception):
    """One record cannot be normalised; `kind` is the problem's category (see validate.py)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class LoadedData:
    """Normalised records: `dataset` has the format's columns plus `source` ("file:line")."""

    format: str
    dataset: Any  # datasets.Dataset
    files: list[str]

    def __len__(self) -> int:
        return len(self.dataset)


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
        bad = next((r for f in files for r in f.records if r.data is None), None)
        if bad is not None and not fields:  # no record could be read: say why the first not
            raise LargeForgeError(
                f"{bad.source}: {bad.error}; no record of {names} could be read, so its format "
                "is unknown"
            )
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

    from largeforge.cache_paths import cache_root

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
