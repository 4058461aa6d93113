"""Push-style incremental text for one generated sequence: token ids in, final text out.

`detokenize_stream` and `cut_at_stop_strings` (in `generate` and `chat`) pull ids from an
iterator; the batching engine instead pushes one id per step for many sequences, so this is the
same logic with the loop turned inside out:

- Detokenizing decodes a short window of the most recent ids rather than everything so far
  (O(1) per token, where re-decoding everything is O(n)): the text of `ids[prefix:]` minus the
  text of `ids[prefix:read]` is what the newest ids add. Both windows start at the same token,
  so tokenizers that treat a leading token specially (SentencePiece's leading space) drop the
  same thing from both. Text ending in U+FFFD (a UTF-8 character split across byte-level
  tokens) is held until the character is complete, and flushed at the end; the pieces joined
  equal `tokenizer.decode(ids)`, as with `detokenize_stream`.
- Stop strings: text that could be the start of a stop string is held back until it is clear
  that it is not; when one appears, the text before it is the last piece.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from largeforge.inference.chat import _partial_stop_suffix
from largeforge.inference.generate import REPLACEMENT_CHAR


class IncrementalText:
    """Feed ids with `push`, end with `flush`; both return (new text, stop string found)."""

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.ids: list[int] = []
        self.prefix = 0  # window start: the text before it has been emitted
        self.read = 0  # ids up to here have been turned into emitted text
        self.pending = ""  # detokenized text held back as a possible start of a stop string
        self.stopped = False

    def push(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if (
            len(after) > len(before)
            and not after.endswith(REPLACEMENT_CHAR)
            and after.startswith(before)
        ):
            self.prefix, self.read = self.read, len(self.ids)
            return self._cut(after[len(before) :])
        return "", False

    def flush(self) -> tuple[str, bool]:
        """The text still held (an incomplete character, a possible stop-string start)."""
        if self.stopped:
            return "", True
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        text, stopped = self._cut(after[len(before) :] if len(after) > len(before) else "")
        if stopped:
            return text, True
        text, self.pending = text + self.pending, ""
        return text, False

    def _cut(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return piece, False
        pending = self.pending + piece
        hits = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending, self.stopped = "", True
            return pending[: min(hits)], True
        keep = _partial_stop_suffix(pending, self.stops)
        self.pending = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep], False
