"""Instruction and chat data for training: records loaded and normalised (`formats.py`),
rendered with a chat template into ids and assistant-only labels (`chat_templates.py`), split
train/val by a stable hash, and samples longer than the sequence length cut or left out (and
counted)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from largeforge.chat_templates import get_template, render_batch_for_training
from largeforge.data.cleaning import in_eval_split, record_text
from largeforge.data.sources import TEXT_SUFFIXES, resolve_sources
from largeforge.errors import LargeForgeError
from largeforge.text_files import BOM, loads

CONVERSATION_FORMATS = ("alpaca", "sharegpt", "messages")
Sample = tuple[list[int], list[int]]


def data_kind(paths: Sequence[str], fmt: str = "auto", text_field: str = "text") -> str:
    """"pretrain" for plain text (text files, `builtin:`, or records with a text field),
    "instruction" for alpaca, sharegpt and messages records."""
    if fmt == "text":
        return "pretrain"
    if fmt in CONVERSATION_FORMATS:
        return "instruction"
    if all(p.startswith("builtin:") or Path(p).suffix.lower() in TEXT_SUFFIXES for p in paths):
        return "pretrain"  # never read a text corpus twice just to learn that it is text
    if _looks_like_streamed_text(paths, text_field):
        return "pretrain"
    from largeforge.data.formats import detect_format, read_records

    detected = detect_format(read_records(list(paths), text_field=text_field), text_field)
    if detected == "text":
        return "pretrain"
    if detected == "preference":
        raise LargeForgeError(
            "this is preference data (prompt/chosen/rejected): it trains with DPO or ORPO, "
            "not with `train`"
        )
    return "instruction"


def _looks_like_streamed_text(paths: Sequence[str], text_field: str) -> bool:
    """True when every input is a text file or JSONL whose first records hold `text_field`, seen
    without reading whole files: pretraining corpora (directories, globs, big JSONL) are streamed
    later and must not be loaded into memory to decide what they are. False means: let a full
    read decide (and report any problem with file:line)."""
    import glob

    from largeforge.data.formats import record_format
    from largeforge.data.readers import is_saved_dataset

    for path in paths:
        local = Path(path)
        if not (path.startswith("builtin:") or local.exists() or glob.has_magic(path)):
            return False  # a hub id, or a missing file the full read will name
        if local.is_dir() and is_saved_dataset(local):
            return False
    try:
        sources = resolve_sources(paths)
    except LargeForgeError:
        return False
    for source in sources:
        if source.path is None or source.path.suffix.lower() in TEXT_SUFFIXES:
            continue
        if source.path.suffix.lower() != ".jsonl":
            return False
        head = _first_records(source.path)
        if not head or any(record_format(r, text_field) != "text" for r in head):
            return False
    return True


def _first_records(path: Path, count: int = 20) -> list[dict]:
    """Up to `count` first records, through the shared checks (`text_files.loads`); [] at the
    first line they refuse, which the full read then reports with file:line."""
    records: list[dict] = []
    with path.open("rb") as handle:
        for raw in handle:
            if len(records) == count:
                break
            if not raw.strip():
                continue
            try:
                record = loads(raw.decode("utf-8").removeprefix(BOM))
            except ValueError:  # not UTF-8, not JSON, or JSON no command can use
                return []
            if not isinstance(record, dict):
                return []
            records.append(record)
    return records


@dataclass
class InstructionCorpus:
    train: list[Sample]
    val: list[Sample]
    template: str
    format: str
    records: int
    overlong: int = 0  # samples longer than seq_len (cut or dropped, as configured)
    dropped: int = 0
    empty: int = 0  # samples with no assistant token to learn from
    texts: list[str] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        tokens = sum(len(ids) for ids, _ in self.train)
        return (
            f"data: {self.records:,} {self.format} records -> {len(self.train):,} train samples "
            f"({tokens:,} tokens), {len(self.val):,} val samples; {self.overlong:,} longer than "
            f"seq_len ({self.dropped:,} dropped), {self.empty:,} without targets left out"
        )


def load_conversations(
    paths: Sequence[str], fmt: str = "auto", *, text_field: str = "text",
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[str, list[list[dict[str, str]]]]:
    from largeforge.data.formats import load_records

    loaded = load_records(list(paths), None if fmt == "auto" else fmt, text_field=text_field,
                          cache_dir=cache_dir)
    if loaded.format not in CONVERSATION_FORMATS:
        raise LargeForgeError(f"expected instruction or chat data, found {loaded.format} records")
    return loaded.format, [list(messages) for messages in loaded.dataset["messages"]]


def conversation_texts(conversations: list[list[dict[str, str]]]) -> Iterator[str]:
    """The text of each conversation, for training a tokenizer on it."""
    for messages in conversations:
        yield record_text({"messages": messages})


def prepare_instruction_data(
    fmt: str,
    conversations: list[list[dict[str, str]]],
    tokenizer: Any,
    *,
    seq_len: int,
    chat_template: str | None = None,
    train_on_prompt: bool = False,
    overlong: str = "truncate",
    val_percent: float = 10.0,
) -> InstructionCorpus:
    """Render every conversation into (ids, labels); split by a stable hash of its text."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        chat_template = "chatml"
    template = get_template(chat_template, tokenizer)
    corpus = InstructionCorpus([], [], template, fmt, len(conversations))
    for start in range(0, len(conversations), 512):
        chunk = conversations[start:start + 512]
        rendered = render_batch_for_training(tokenizer, chunk, template,
                                             train_on_prompt=train_on_prompt)
        for messages, (ids, labels) in zip(chunk, rendered, strict=True):
            if len(ids) > seq_len:
                corpus.overlong += 1
                if overlong == "drop":
                    corpus.dropped += 1
                    continue
                ids, labels = ids[:seq_len], labels[:seq_len]
            if all(label == -100 for label in labels[1:]):
                corpus.empty += 1
                continue
            text = record_text({"messages": messages})
            (corpus.val if in_eval_split(text, val_percent) else corpus.train).append((ids, labels))
    if not corpus.train:
        raise LargeForgeError(
            "no training sample left: every conversation was dropped as too long or has no "
            "assistant tokens; raise data.seq_len or set data.overlong=truncate"
        )
    return corpus
