"""Check every record of a dataset and report each problem with its file:line.

Problems (the `kind` of each):

    bad_json         a line (or array item) that is not a JSON object, is nested too deep, or
                     holds a string that is not Unicode text (a lone surrogate, "\\ud800")
    missing_field    a field the format needs is absent (or null)
    bad_field        a field of the wrong type, or an hh-rlhf dialogue that does not parse
    unknown_role     a speaker that is not system/user/assistant (human/gpt in ShareGPT)
    empty_field      empty text, instruction, prompt, user or system message, or no messages
    empty_assistant  an assistant message (an Alpaca output, a chosen/rejected answer) is empty
    role_order       system not first, a conversation not opening on the user, two turns in a row
    ends_on_user     a conversation whose last message is the user's
    identical_pair   a preference pair whose chosen and rejected answers are the same
    too_long         more tokens than --max-length (with --tokenizer)
    duplicate        the same record as an earlier one, after normalising whitespace

A record is valid when it has none. The input is only read; `write_clean` writes the valid
records, as they were in the input, to a new JSONL file. `DatasetValidator` is the same check
for Python callers, on files or on records held in memory.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from largeforge.atomic_files import replace_path
from largeforge.data.formats import (
    RecordProblem,
    check_columns,
    check_format,
    detect_format,
    normalise_record,
)
from largeforge.data.readers import RawFile, RawRecord, read_records
from largeforge.errors import LargeForgeError
from largeforge.text_files import string_problem

PROBLEM_KINDS = (
    "bad_json", "missing_field", "bad_field", "unknown_role", "empty_field", "empty_assistant",
    "role_order", "ends_on_user", "identical_pair", "too_long", "duplicate",
)
_TOKENIZE_BATCH = 1000


@dataclass(frozen=True)
class Problem:
    source: str  # "file:line"
    kind: str  # one of PROBLEM_KINDS
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.kind}: {self.message}"


@dataclass
class ValidationReport:
    """What `validate_records` found: every problem, and the records that have none."""

    format: str
    files: list[str]
    total: int = 0
    problems: list[Problem] = field(default_factory=list)
    valid: list[RawRecord] = field(default_factory=list)
    dropped: Counter[str] = field(default_factory=Counter)  # invalid records by first problem

    @property
    def invalid(self) -> int:
        return self.total - len(self.valid)

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        """Problems per kind, in PROBLEM_KINDS order, kinds with none left out."""
        counter = Counter(p.kind for p in self.problems)
        return {kind: counter[kind] for kind in PROBLEM_KINDS if counter[kind]}

    @property
    def valid_records(self) -> list[dict[str, Any]]:
        """The valid records as they were in the input."""
        return [record.data for record in self.valid if record.data is not None]

    def write_clean(self, output: str | os.PathLike[str]) -> int:
        """Write the valid records to `output` (JSONL); see `write_clean`."""
        return write_clean(self, output)


def validate_records(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    format: str | None = None,
    *,
    text_field: str = "text",
    tokenizer: Any = None,
    max_length: int | None = None,
) -> ValidationReport:
    """Check every record of the input. `tokenizer` (a path or a loaded tokenizer) and
    `max_length` go together: samples with more tokens are `too_long`. Conversations are measured
    as the tokenizer's chat template renders them, or as "role: content" lines without one.

    Input that cannot be read at all (a missing or binary file, a CSV without the format's
    columns, two formats in one input) raises `LargeForgeError`."""
    _check_settings(format, tokenizer, max_length)
    return validate_raw_files(read_records(paths, text_field=text_field), format,
                              text_field=text_field, tokenizer=tokenizer, max_length=max_length)


def _check_settings(format: str | None, tokenizer: Any, max_length: int | None) -> None:
    if (tokenizer is None) != (max_length is None):
        raise LargeForgeError("--tokenizer and --max-length go together: give both or neither")
    if max_length is not None and max_length < 1:
        raise LargeForgeError(f"--max-length must be at least 1, got {max_length}")
    if format is not None:
        check_format(format)


def validate_raw_files(
    raw_files: list[RawFile],
    format: str | None = None,
    *,
    text_field: str = "text",
    tokenizer: Any = None,
    max_length: int | None = None,
) -> ValidationReport:
    """`validate_records` on records already read (`readers.read_records`, or records held in
    memory wrapped by `records_as_raw_file`)."""
    _check_settings(format, tokenizer, max_length)
    fmt = format or detect_format(raw_files, text_field)
    for raw_file in raw_files:
        check_columns(raw_file, fmt, text_field)
    if isinstance(tokenizer, (str, os.PathLike)):
        from largeforge.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)

    report = ValidationReport(fmt, [f.path for f in raw_files])
    records = [record for raw_file in raw_files for record in raw_file.records]
    report.total = len(records)
    if not records:
        raise LargeForgeError(f"no records in {', '.join(report.files)}")
    per_record: list[list[Problem]] = []
    normalised: list[dict[str, Any] | None] = []
    for record in records:
        found, shaped = _check_record(record, fmt, text_field)
        per_record.append(found)
        normalised.append(shaped)

    seen: dict[str, str] = {}
    for index, shaped in enumerate(normalised):
        if shaped is None:
            continue
        key = _dedup_key(shaped)
        if key in seen:
            per_record[index].append(
                Problem(records[index].source, "duplicate", f"same as {seen[key]}")
            )
        else:
            seen[key] = records[index].source

    if tokenizer is not None and max_length is not None:
        measured = [i for i, shaped in enumerate(normalised) if shaped is not None]
        lengths = _token_lengths([normalised[i] for i in measured], tokenizer)  # type: ignore[misc]
        for index, length in zip(measured, lengths, strict=True):
            if length > max_length:
                per_record[index].append(Problem(
                    records[index].source, "too_long",
                    f"{length} tokens, more than --max-length {max_length}",
                ))

    for record, found in zip(records, per_record, strict=True):
        if found:
            report.problems.extend(found)
            report.dropped[found[0].kind] += 1
        else:
            report.valid.append(record)
    return report


def _check_record(
    record: RawRecord, fmt: str, text_field: str
) -> tuple[list[Problem], dict[str, Any] | None]:
    """The record's problems, and its normalised shape (None when it has none)."""
    if record.data is None:
        return [Problem(record.source, "bad_json", record.error or "not a JSON object")], None
    try:
        shaped = normalise_record(record.data, fmt, text_field)
    except RecordProblem as problem:
        return [Problem(record.source, problem.kind, problem.message)], None
    found: list[tuple[str, str]] = []
    if fmt == "text":
        if not shaped["text"].strip():
            found.append(("empty_field", f"{text_field!r} is empty"))
    elif fmt == "preference":
        found.extend(_check_preference(shaped))
    else:
        found.extend(_check_conversation(shaped["messages"]))
    unique = list(dict.fromkeys(found))
    return [Problem(record.source, kind, message) for kind, message in unique], shaped


def _check_conversation(
    messages: list[dict[str, str]], label: str = "", check_content: bool = True
) -> list[tuple[str, str]]:
    where = f"{label} " if label else ""
    if not messages:
        return [("empty_field", f"{where}conversation has no messages")]
    found = _check_content(messages, label) if check_content else []
    turns = messages
    if messages[0]["role"] == "system":
        turns = messages[1:]
    for index, message in enumerate(turns):
        position = index + 1 + (len(messages) - len(turns))
        if message["role"] == "system":
            found.append(("role_order", f"{where}message {position} is a system message; "
                                        "only the first message may be"))
        elif index == 0 and message["role"] != "user":
            found.append(("role_order", f"{where}conversation opens with the assistant "
                                        f"(message {position}); the user speaks first"))
        elif index > 0 and message["role"] == turns[index - 1]["role"]:
            found.append(("role_order", f"{where}messages {position - 1} and {position} are "
                                        f"both {message['role']}; turns must alternate"))
    if not turns:
        found.append(("empty_field", f"{where}conversation has only a system message"))
    elif turns[-1]["role"] == "user":
        found.append(("ends_on_user", f"{where}conversation ends on a user turn "
                                      f"(message {len(messages)}); it needs an assistant answer"))
    return found


def _check_content(messages: list[dict[str, str]], label: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    where = f"{label} " if label else ""
    for index, message in enumerate(messages):
        if not message["content"].strip():
            kind = "empty_assistant" if message["role"] == "assistant" else "empty_field"
            found.append((kind, f"{where}message {index + 1} ({message['role']}) is empty"))
    return found


def _check_preference(shaped: dict[str, Any]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if not shaped["prompt"]:
        found.append(("empty_field", "the prompt is empty"))
    found.extend(_check_content(shaped["prompt"], "prompt"))
    for side in ("chosen", "rejected"):
        if not shaped[side]:
            found.append(("empty_assistant", f"{side!r} has no answer"))
            continue
        found.extend(_check_content(shaped[side], side))
        problems = _check_conversation(shaped["prompt"] + shaped[side], side, check_content=False)
        if not shaped["prompt"]:
            problems = [p for p in problems if p[0] != "role_order"]
        found.extend(problems)
    if shaped["chosen"] and shaped["chosen"] == shaped["rejected"]:
        found.append(("identical_pair", "chosen and rejected are the same"))
    return found


def _dedup_key(shaped: dict[str, Any]) -> str:
    def squash(value: Any) -> Any:
        if isinstance(value, str):
            return " ".join(value.split())
        if isinstance(value, list):
            return [squash(v) for v in value]
        if isinstance(value, dict):
            return {k: squash(v) for k, v in value.items()}
        return value

    return json.dumps(squash(shaped), sort_keys=True, ensure_ascii=False)


def render_for_length(messages: list[dict[str, str]], tokenizer: Any) -> str:
    """A conversation as the tokenizer's own chat template renders it, or, without one, as
    "role: content" lines."""
    if getattr(tokenizer, "chat_template", None):
        try:
            return str(tokenizer.apply_chat_template(messages, tokenize=False))
        except Exception:  # a template that rejects this conversation (say, a system turn)
            pass
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _token_lengths(shaped: list[dict[str, Any]], tokenizer: Any) -> list[int]:
    """The length in tokens of each record (a preference pair: its longer side)."""
    texts: list[str] = []
    owners: list[int] = []
    for index, record in enumerate(shaped):
        if "text" in record:
            texts.append(record["text"])
            owners.append(index)
        elif "messages" in record:
            texts.append(render_for_length(record["messages"], tokenizer))
            owners.append(index)
        else:
            for side in ("chosen", "rejected"):
                texts.append(render_for_length(record["prompt"] + record[side], tokenizer))
                owners.append(index)
    lengths = [0] * len(shaped)
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        batch = texts[start:start + _TOKENIZE_BATCH]
        encoded = tokenizer(batch, add_special_tokens=True)["input_ids"]
        for owner, ids in zip(owners[start:start + _TOKENIZE_BATCH], encoded, strict=True):
            lengths[owner] = max(lengths[owner], len(ids))
    return lengths


def write_clean(report: ValidationReport, output: str | os.PathLike[str]) -> int:
    """Write the valid records, as they were in the input, one JSON object a line, to `output`
    (a new file; never one of the inputs). Returns the number written."""
    target = Path(output).expanduser()
    for name in report.files:
        source = Path(name)
        if source.exists() and target.exists() and target.resolve() == source.resolve():
            raise LargeForgeError(
                f"--output {output} is the input file; the input is never modified, choose "
                "another path"
            )
        if source.is_dir() and target.resolve().is_relative_to(source.resolve()):
            raise LargeForgeError(f"--output {output} is inside the input directory {name}")
    if target.is_dir():
        raise LargeForgeError(f"--output {output} is a directory; give a file name (.jsonl)")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            for record in report.valid:
                out.write(json.dumps(record.data, ensure_ascii=False, default=str) + "\n")
        replace_path(Path(staging), target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return len(report.valid)


IN_MEMORY = "<records>"


def records_as_raw_file(records: Iterable[Any], name: str = IN_MEMORY) -> RawFile:
    """Records held in memory (dicts; anything else, or a dict holding a string that is not
    Unicode text, is reported as `bad_json`, as the file readers report them) as one input
    "file" named `name`, each record's source `name:N` (N counted from 1)."""
    raw = RawFile(name, "json")
    for number, record in enumerate(records, 1):
        where = f"{name}:{number}"
        problem = string_problem(record) if isinstance(record, Mapping) else (
            f"not a JSON object: {type(record).__name__}")
        if problem is None:
            raw.records.append(RawRecord(where, dict(record)))
        else:
            raw.records.append(RawRecord(where, None, problem))
    return raw


class DatasetValidator:
    """Check datasets as `largeforge data validate` does, for use from Python:

        report = DatasetValidator(format="alpaca").validate(records)
        report.ok, report.counts(), [str(p) for p in report.problems], report.valid_records

    - `format`: text, alpaca, sharegpt, messages or preference (None: detected).
    - `tokenizer` (a directory or a loaded tokenizer) and `max_length` go together: samples with
      more tokens are `too_long`.
    - `text_field`: the text field of text records.
    """

    def __init__(
        self,
        format: str | None = None,
        *,
        text_field: str = "text",
        tokenizer: Any = None,
        max_length: int | None = None,
    ) -> None:
        _check_settings(format, tokenizer, max_length)
        self.format = format
        self.text_field = text_field
        self.tokenizer = tokenizer
        self.max_length = max_length

    def validate(self, records: Any) -> ValidationReport:
        """Check `records`: a list of dicts (or a `datasets.Dataset`), whose problems name
        `<records>:N`; or a path, a glob or a list of them, read as the command reads files."""
        if isinstance(records, (str, os.PathLike)) or (
            isinstance(records, Sequence) and records
            and all(isinstance(r, (str, os.PathLike)) for r in records)
        ):
            return validate_records(records, self.format, text_field=self.text_field,
                                    tokenizer=self.tokenizer, max_length=self.max_length)
        if hasattr(records, "to_list"):  # datasets.Dataset
            records = records.to_list()
        if isinstance(records, Mapping):
            records = [records]
        return validate_raw_files([records_as_raw_file(records)], self.format,
                                  text_field=self.text_field, tokenizer=self.tokenizer,
                                  max_length=self.max_length)
