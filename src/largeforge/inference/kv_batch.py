"""One left-padded KV cache for the running sequences of the continuous-batching engine.

Each row is one sequence; its cached tokens sit at the right end of the row, padding (hidden by
the attention mask) on the left. Sequences join with the cache of their prefill (several
left-padded prompts prefilled together, or one), padded on the left to the batch's width or the
batch padded to theirs, and leave by dropping their row; columns that have become padding in
every row are then cut off, so the width is always the longest running sequence.

Why one batched cache and not a cache per sequence assembled every step: `DynamicCache` already
copies the whole cache on every step (`torch.cat` in `DynamicLayer.update`); assembling
per-sequence caches adds a padded copy in and a split copy out on every step. Measured on this
2-core CPU (one thread) with a dim-256 x 4-layer Llama and 16 sequences of 85-150 tokens:
assembling and splitting cost about 14 ms per step, while the whole batched decode step takes
about 18 ms. Here joins and leaves cost one copy each, and they are far rarer than steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from largeforge.errors import LargeForgeError


def plain_cache() -> DynamicCache:
    """A cache of plain full-attention layers (created lazily by the first forward)."""
    return DynamicCache()


def _pad_left(tensor: Tensor, columns: int) -> Tensor:
    """`tensor` [batch, heads, seq, dim] with `columns` zero columns before its seq dim."""
    return F.pad(tensor, (0, 0, columns, 0)) if columns else tensor


class PaddedKVBatch:
    """The batched cache plus each row's real length (tokens cached for it)."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.lengths: list[int] = []
        self.width = 0  # columns in the cache: the longest row

    def __len__(self) -> int:
        return len(self.lengths)

    def add(
        self, cache: DynamicCache, lengths: int | Sequence[int], rows: Sequence[int] | None = None
    ) -> None:
        """Append rows from the cache of a prefill: `cache` [n, heads, width, dim] holds `n`
        left-padded prompts of `lengths` tokens (an int for one prompt); `rows` picks which of
        them join (all by default; a prompt that finished at its first token does not)."""
        layers = cache.layers
        for layer in layers:
            # Sliding-window, quantized or static layers keep other shapes and state.
            if type(layer) is not DynamicLayer:
                raise LargeForgeError(
                    f"continuous batching supports full-attention KV caches only; this model's "
                    f"cache has {type(layer).__name__} layers"
                )
        lengths = [lengths] if isinstance(lengths, int) else list(lengths)
        if rows is not None and list(rows) != list(range(len(lengths))):
            index = torch.tensor(list(rows), dtype=torch.long, device=layers[0].keys.device)
            lengths = [lengths[r] for r in rows]
            for layer in layers:
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)
        if not lengths:
            return
        longest = max(lengths)
        cut = layers[0].keys.size(-2) - longest  # columns that are padding in every kept row
        if cut > 0:
            for layer in layers:
                layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]
        if self.cache is None or not self.lengths:
            self.cache, self.lengths, self.width = cache, lengths, longest
            return
        width = max(self.width, longest)
        for mine, theirs in zip(self.cache.layers, layers, strict=True):
            mine.keys = torch.cat(
                [_pad_left(mine.keys, width - self.width), _pad_left(theirs.keys, width - longest)]
            )
            mine.values = torch.cat(
                [
                    _pad_left(mine.values, width - self.width),
                    _pad_left(theirs.values, width - longest),
                ]
            )
        self.lengths += lengths
        self.width = width

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order), then cut the columns no row uses any more."""
        if not rows:
            self.cache, self.lengths, self.width = None, [], 0
            return
        if rows == list(range(len(self.lengths))):
            return
        assert self.cache is not None
        index = torch.tensor(rows, dtype=torch.long, device=self.cache.layers[0].keys.device)
        self.lengths = [self.lengths[r] for r in rows]
        cut = self.width - max(self.lengths)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, cut:, :]
            layer.values = layer.values.index_select(0, index)[:, :, cut:, :]
        self.width -= cut

    def step_inputs(self, device: torch.device) -> tuple[Tensor | None, Tensor]:
        """(attention mask [rows, width + 1] or None when no row is padded, position ids
        [rows, 1]) for a decode step that feeds one new token per row."""
        lengths = torch.tensor(self.lengths, dtype=torch.long, device=device)
        positions = lengths.unsqueeze(1)
        if min(self.lengths) == self.width:
            return None, positions
        columns = torch.arange(self.width + 1, device=device).unsqueeze(0)
        mask = (columns >= (self.width - lengths).unsqueeze(1)).long()
        return mask, positions

    def advance(self) -> None:
        """Every row got one more cached token (the decode step's forward appended them)."""
        self.lengths = [n + 1 for n in self.lengths]
        self.width += 1
