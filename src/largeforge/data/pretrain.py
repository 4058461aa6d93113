"""Tokenize a corpus once into memory-mapped shards, cached by content and tokenizer.

Layout of a cache entry `<cache>/tokens/<key>/`:
    manifest.json       what was tokenized, how, and where each split's tokens lie
    tokens-00000.bin    raw uint16 (vocab <= 65,536) or uint32 token ids, EOS after each document
The key hashes the sources' content, the reading options, the split and the tokenizer, so any
change makes a new entry and an unchanged corpus is never tokenized twice. Entries are built in a
temporary directory and renamed into place, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from largeforge.cache_paths import cache_root
from largeforge.data.cleaning import in_eval_split
from largeforge.data.sources import Source, fingerprint, iter_documents, resolve_sources
from largeforge.errors import LargeForgeError
from largeforge.tokenizer import TEXT_PIECE_CHARS, text_pieces, tokenizer_fingerprint

MANIFEST_VERSION = 3  # 2: the document split uses cleaning.in_eval_split; 3: long texts in pieces
ENCODE_BATCH_DOCS = 512
SPLITS = ("document", "tail")


class TokenArray:
    """A read-only sequence of token ids spread over memory-mapped segments of shard files."""

    def __init__(self, segments: list[np.ndarray]) -> None:
        self._segments = [s for s in segments if len(s)]
        self._starts = np.cumsum([0] + [len(s) for s in self._segments])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def window(self, start: int, length: int) -> torch.Tensor:
        """Tokens [start, start + length) as a new int64 tensor."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"window {start}+{length} outside {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        filled = 0
        index = int(np.searchsorted(self._starts, start, side="right")) - 1
        offset = start - int(self._starts[index])
        while filled < length:
            segment = self._segments[index]
            take = min(length - filled, len(segment) - offset)
            out[filled:filled + take] = segment[offset:offset + take]
            filled += take
            index, offset = index + 1, 0
        return torch.from_numpy(out)

    def to_numpy(self) -> np.ndarray:
        return np.concatenate([np.asarray(s) for s in self._segments]) if self._segments else (
            np.empty(0, dtype=np.int64)
        )


@dataclass
class TokenizedCorpus:
    train: TokenArray
    val: TokenArray
    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    def summary(self) -> str:
        m = self.manifest
        docs = m.get("documents", {})
        return (
            f"data: {len(self.train):,} train tokens ({docs.get('train', 0):,} documents), "
            f"{len(self.val):,} val tokens ({docs.get('val', 0):,} documents), split "
            f"{m.get('split')}; {'cached' if self.cached else 'tokenized'} at {self.path}"
        )


def prepare_pretraining_data(
    paths: Iterable[str | os.PathLike[str]] | list[Source],
    tokenizer: Any,
    *,
    text_field: str = "text",
    doc_separator: str | None = "<|endoftext|>",
    val_percent: float = 10.0,
    split: str = "document",
    cache_dir: str | Path | None = None,
    shard_tokens: int = 2**26,
    log: Callable[[str], None] | None = None,
) -> TokenizedCorpus:
    """Tokenize (or reuse the cached tokens of) a corpus and split it into train and val.

    `split="document"` puts each document in val with probability `val_percent`% by a stable hash
    of its text (so the split does not depend on file order); `"tail"` puts the last
    `val_percent`% of tokens in val. When a document split leaves val empty (a corpus of one
    document, say), the tail split is used instead.
    """
    if split not in SPLITS:
        raise LargeForgeError(f"data.split must be one of {', '.join(SPLITS)}, not {split!r}")
    if not 0 <= val_percent < 100:
        raise LargeForgeError(f"data.val_percent must be in [0, 100), not {val_percent}")
    items = list(paths)
    sources = items if items and all(isinstance(s, Source) for s in items) else (
        resolve_sources(items)  # type: ignore[arg-type]
    )
    options = json.dumps(
        {"text_field": text_field, "sep": doc_separator, "val": val_percent, "split": split,
         "v": MANIFEST_VERSION}, sort_keys=True,
    )
    key = fingerprint(sources, extra=options + tokenizer_fingerprint(tokenizer))  # type: ignore[arg-type]
    root = cache_root(cache_dir) / "tokens"
    entry = root / key
    if (entry / "manifest.json").is_file():
        return _open(entry, cached=True)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        started = time.perf_counter()
        manifest = _build(
            staging, sources, tokenizer, text_field=text_field, doc_separator=doc_separator,
            val_percent=val_percent, split=split, shard_tokens=shard_tokens,
        )
        manifest["seconds"] = round(time.perf_counter() - started, 2)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        try:
            staging.rename(entry)
        except OSError:  # another process built the same entry first; theirs is as good
            if not (entry / "manifest.json").is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if log:
        log(f"tokenized {manifest['documents']['total']:,} documents in {manifest['seconds']}s")
    return _open(entry, cached=False)


class _ShardWriter:
    """Appends token ids to `tokens-NNNNN.bin` files of at most `shard_tokens` tokens each."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.shards: list[int] = []  # tokens per shard
        self._handle: BinaryIO | None = None

    @property
    def position(self) -> tuple[int, int]:
        """(shard index, offset) where the next token goes."""
        if not self.shards or self.shards[-1] == self.shard_tokens:
            return len(self.shards), 0
        return len(self.shards) - 1, self.shards[-1]

    def write(self, ids: np.ndarray) -> list[tuple[int, int, int]]:
        """Write ids; return the (shard, start, end) pieces they landed in."""
        pieces = []
        done = 0
        while done < len(ids):
            if not self.shards or self.shards[-1] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]
            chunk = ids[done:done + room]
            assert self._handle is not None
            self._handle.write(chunk.astype(self.dtype, copy=False).tobytes())
            start = self.shards[-1]
            self.shards[-1] += len(chunk)
            pieces.append((len(self.shards) - 1, start, self.shards[-1]))
            done += len(chunk)
        return pieces

    def _open_next(self) -> None:
        self.close()
        self.shards.append(0)
        self._handle = (self.directory / shard_name(len(self.shards) - 1)).open("wb")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def shard_name(index: int) -> str:
    return f"tokens-{index:05d}.bin"


def _encoded_documents(
    documents: Iterable[str], tokenizer: Any, eos: int
) -> Iterator[tuple[str, list[int]]]:
    batch: list[str] = []

    def flush() -> Iterator[tuple[str, list[int]]]:
        for text, ids in zip(batch, _encode(tokenizer, batch), strict=True):
            yield text, [*ids, eos]
        batch.clear()

    for document in documents:
        if len(document) > TEXT_PIECE_CHARS:  # memory follows the piece, not the document
            yield from flush()
            ids = [i for piece in text_pieces(document) for i in _encode(tokenizer, [piece])[0]]
            yield document, [*ids, eos]
            continue
        batch.append(document)
        if len(batch) >= ENCODE_BATCH_DOCS:
            yield from flush()
    if batch:
        yield from flush()


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # A literal "</s>" in a document is text, not an end of document.
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _build(
    directory: Path,
    sources: list[Source],
    tokenizer: Any,
    *,
    text_field: str,
    doc_separator: str | None,
    val_percent: float,
    split: str,
    shard_tokens: int,
) -> dict[str, Any]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LargeForgeError("the tokenizer has no EOS token to separate documents with")
    dtype = np.dtype(np.uint16 if len(tokenizer) <= 2**16 else np.uint32)
    writer = _ShardWriter(directory, dtype, shard_tokens)
    splits: dict[str, list[list[int]]] = {"train": [], "val": []}
    documents = {"train": 0, "val": 0}
    stats: dict[str, int] = {}
    stream = iter_documents(sources, text_field=text_field, doc_separator=doc_separator,
                            stats=stats)
    try:
        for text, ids in _encoded_documents(stream, tokenizer, eos):
            name = "val" if split == "document" and in_eval_split(text, val_percent) else "train"
            documents[name] += 1
            for piece in writer.write(np.asarray(ids, dtype=np.int64)):
                _append_piece(splits[name], piece)
    finally:
        writer.close()
    total_docs = documents["train"] + documents["val"]
    if total_docs == 0:
        names = ", ".join(s.name for s in sources)
        raise LargeForgeError(f"the training data holds no non-empty document ({names})")
    used_split = split
    if val_percent > 0 and (split == "tail" or not splits["val"] or not splits["train"]):
        used_split = "tail"
        splits["train"] += splits["val"]
        splits["train"].sort()
        splits["val"] = []
        documents = {"train": total_docs, "val": 0}
        total = sum(end - start for _, start, end in splits["train"])
        n_val = int(round(total * val_percent / 100))
        splits["train"], splits["val"] = _cut_tail(splits["train"], n_val)
    if not splits["train"]:
        raise LargeForgeError("the training split is empty: lower data.val_percent")
    return {
        "version": MANIFEST_VERSION,
        "dtype": dtype.name,
        "vocab_size": len(tokenizer),
        "eos_token_id": eos,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "sources": [s.name for s in sources],
        "text_field": text_field,
        "doc_separator": doc_separator,
        "val_percent": val_percent,
        "split": used_split,
        "shards": [{"file": shard_name(i), "tokens": n} for i, n in enumerate(writer.shards)],
        "segments": splits,
        "documents": {**documents, "total": total_docs,
                      "skipped_empty": stats.get("skipped_empty", 0)},
        "tokens": {name: sum(e - s for _, s, e in segs) for name, segs in splits.items()},
    }


def _append_piece(segments: list[list[int]], piece: tuple[int, int, int]) -> None:
    """Add a (shard, start, end) piece, merging it into the last one when contiguous."""
    shard, start, end = piece
    if segments and segments[-1][0] == shard and segments[-1][2] == start:
        segments[-1][2] = end
    else:
        segments.append([shard, start, end])


def _cut_tail(
    segments: list[list[int]], n_tail: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Split contiguous segments into (all but the last n_tail tokens, the last n_tail)."""
    head: list[list[int]] = [list(s) for s in segments]
    tail: list[list[int]] = []
    while n_tail > 0 and head:
        shard, start, end = head.pop()
        take = min(n_tail, end - start)
        tail.insert(0, [shard, end - take, end])
        if take < end - start:
            head.append([shard, start, end - take])
        n_tail -= take
    return head, tail


def _open(entry: Path, *, cached: bool) -> TokenizedCorpus:
    manifest = json.loads((entry / "manifest.json").read_text(encoding="utf-8"))
    dtype = np.dtype(manifest["dtype"])
    maps = [
        np.memmap(entry / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],))
        if s["tokens"] else np.empty(0, dtype=dtype)
        for s in manifest["shards"]
    ]

    def array(name: str) -> TokenArray:
        return TokenArray([maps[shard][start:end] for shard, start, end in
                           manifest["segments"][name]])

    return TokenizedCorpus(array("train"), array("val"), entry, manifest, cached)
