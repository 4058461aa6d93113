"""Where training text comes from: files, directories, globs, JSON/JSONL, or a built-in corpus.

Documents are streamed one at a time; no source is ever read whole into memory except a single
`.json` file (a JSON array must be parsed at once) and single documents.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from largeforge.errors import LargeForgeError
from largeforge.text_files import decode_utf8, describe_json_error, iter_json_lines, loads

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSON_SUFFIXES = (".json", ".jsonl")
BUILTIN_PREFIX = "builtin:"
BUILTINS = ("python-docs",)
_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """One input: a file on disk, or a built-in corpus (`path` is then None)."""

    kind: str  # "text", "jsonl", "json" or "builtin"
    name: str
    path: Path | None = None

    def fingerprint(self) -> str:
        """sha256 of the content (streamed), so a cache follows the bytes, not the file name."""
        if self.path is None:
            from largeforge.quickstart_corpus import corpus_version

            return f"{self.name}:{corpus_version()}"
        digest = hashlib.sha256()
        with self.path.open("rb") as handle:
            while chunk := handle.read(_READ_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()


def resolve_sources(paths: Iterable[str | os.PathLike[str]]) -> list[Source]:
    """Expand files, directories (recursively), globs and `builtin:` names into sources."""
    sources: list[Source] = []
    for raw in paths:
        text = str(raw)
        if text.startswith(BUILTIN_PREFIX):
            name = text[len(BUILTIN_PREFIX):]
            if name not in BUILTINS:
                raise LargeForgeError(
                    f"unknown built-in corpus {text!r}; known: "
                    + ", ".join(BUILTIN_PREFIX + b for b in BUILTINS)
                )
            sources.append(Source("builtin", text))
            continue
        path = Path(text).expanduser()
        if glob.has_magic(text):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True))
            files = [m for m in matches if m.is_file()]
            if not files:
                raise LargeForgeError(f"no file matches the data pattern {text!r}")
            sources.extend(_file_source(f) for f in files)
        elif path.is_dir():
            files = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSON_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not files:
                raise LargeForgeError(
                    f"data directory {text} holds no text or JSON files "
                    f"({', '.join(TEXT_SUFFIXES + JSON_SUFFIXES)})"
                )
            sources.extend(_file_source(f) for f in files)
        elif path.is_file():
            sources.append(_file_source(path))
        else:
            raise LargeForgeError(f"data file not found: {text}")
    for source in sources:
        if source.path is not None and source.path.stat().st_size == 0:
            raise LargeForgeError(f"data file is empty: {source.path}")
    return sources


def _file_source(path: Path) -> Source:
    suffix = path.suffix.lower()
    kind = "jsonl" if suffix == ".jsonl" else "json" if suffix == ".json" else "text"
    return Source(kind, str(path), path)


def iter_documents(
    sources: Iterable[Source],
    *,
    text_field: str = "text",
    doc_separator: str | None = "<|endoftext|>",
    stats: dict[str, int] | None = None,
) -> Iterator[str]:
    """Yield documents, in order. Plain text files are split on `doc_separator` (a file without
    one is one document); JSON/JSONL records give their `text_field`. Empty documents are skipped
    and counted in `stats["skipped_empty"]`."""
    counts = stats if stats is not None else {}
    for key in ("documents", "skipped_empty", "files"):
        counts.setdefault(key, 0)
    for source in sources:
        counts["files"] += 1
        if source.kind == "builtin":
            from largeforge.quickstart_corpus import iter_python_docs

            documents: Iterable[str] = iter_python_docs()
        elif source.kind == "jsonl":
            documents = _iter_jsonl(source.path, text_field)  # type: ignore[arg-type]
        elif source.kind == "json":
            documents = _iter_json(source.path, text_field)  # type: ignore[arg-type]
        else:
            documents = _iter_text(source.path, doc_separator)  # type: ignore[arg-type]
        for document in documents:
            if document.strip():
                counts["documents"] += 1
                yield document
            else:
                counts["skipped_empty"] += 1


def _iter_text(path: Path, separator: str | None) -> Iterator[str]:
    """Stream a text file in chunks, splitting on the separator across chunk boundaries. Each
    chunk is decoded by the shared `decode_utf8` (a BOM at the start dropped, a bad byte named
    by file:line and offset)."""
    decoder_offset = 0
    line = 1
    pending = ""
    with path.open("rb") as handle:
        carry = b""
        while True:
            chunk = handle.read(_READ_CHUNK)
            data = carry + chunk
            if not data:
                break
            # Decode up to the last complete UTF-8 character; keep the tail for the next read.
            cut = len(data) if not chunk else _complete_utf8_prefix(data)
            text = decode_utf8(data[:cut], path, offset=decoder_offset, line=line)
            line += text.count("\n")
            decoder_offset += cut
            carry = data[cut:]
            pending += text
            if separator:
                parts = pending.split(separator)
                pending = parts.pop()
                yield from parts
            if not chunk:
                break
    if pending:
        yield pending


def _complete_utf8_prefix(data: bytes) -> int:
    """Length of `data` without a trailing, incomplete UTF-8 sequence (at most 3 bytes)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte or ASCII
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 \
                else 4 if byte >> 3 == 0b11110 else 1
            return len(data) if need <= back else len(data) - back
    return len(data)


def _record_text(record: object, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise LargeForgeError(f"{where}: expected a JSON object with a {text_field!r} field")
    if text_field not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise LargeForgeError(
            f"{where}: no {text_field!r} field (fields: {keys}); set data.text_field"
        )
    value = record[text_field]
    if not isinstance(value, str):
        raise LargeForgeError(f"{where}: field {text_field!r} is {type(value).__name__}, not text")
    return value


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    """The shared JSONL reader (`text_files.iter_json_lines`), streamed: the first line it
    cannot use (not JSON, nested too deep, a lone surrogate) stops the read, naming file:line."""
    for line in iter_json_lines(path):
        if line.error is not None:
            raise LargeForgeError(f"{line.where}: {line.error}")
        yield _record_text(line.value, text_field, line.where)


def _iter_json(path: Path, text_field: str) -> Iterator[str]:
    text = decode_utf8(path.read_bytes(), path)
    try:
        data = loads(text)
    except json.JSONDecodeError as error:
        raise LargeForgeError(f"{path}:{error.lineno}: {describe_json_error(error)}") from None
    records = data if isinstance(data, list) else [data]
    for index, record in enumerate(records):
        yield _record_text(record, text_field, f"{path} (record {index})")


def fingerprint(sources: Iterable[Source], extra: str = "") -> str:
    """A key that changes when the content, kind or order of any source changes."""
    digest = hashlib.sha256(extra.encode())
    for source in sources:
        digest.update(b"\0" + source.kind.encode() + b"\0" + source.fingerprint().encode())
    return digest.hexdigest()[:20]
