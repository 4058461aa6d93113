"""Batches for instruction data: padded with length grouping, or packed with no attention across
samples; both resumable to the exact batch.

A sample is `(input_ids, labels)` with labels aligned with the ids (-100 where there is no
target); the model shifts them, as Hugging Face causal LMs do.

Packing puts several samples in one row. Each sample's position ids restart at 0, and that is
what keeps samples apart: transformers 5 (`masking_utils.find_packed_sequence_indices`) reads a
restart of the position ids as the start of a new sequence and builds a block-diagonal causal
mask (SDPA, eager, flex), and its flash-attention path turns the same restarts into
variable-length sequence boundaries. It does so only when no 2D attention mask and no KV cache
are given, so a packed batch has no `attention_mask` and the forward pass must run with
`use_cache=False`. `mask="4d"` adds an explicit block-diagonal causal mask
`[batch, 1, seq, seq]` (True = may attend) for models or kernels that do not detect packing.
The first label of every sample is -100, so no sample's first token is a target of the sample
before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from largeforge.errors import LargeForgeError

IGNORE_INDEX = -100

Sample = tuple[Sequence[int], Sequence[int]]


def _check_samples(samples: Sequence[Sample]) -> None:
    if not samples:
        raise LargeForgeError("no instruction samples to batch")
    for i, (ids, labels) in enumerate(samples):
        if len(ids) != len(labels):
            raise LargeForgeError(
                f"sample {i} has {len(ids)} input ids but {len(labels)} labels"
            )
        if not ids:
            raise LargeForgeError(f"sample {i} is empty")


def seeded_permutation(n: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator).tolist()


class EpochBatches:
    """An epoch is a list of batches (lists of sample indices) built from `seed + epoch` alone;
    (epoch, position) is the whole data position. Subclasses say how an epoch is planned and a
    batch collated, and may check their items differently (`_check`)."""

    def __init__(self, samples: Sequence[Any], seed: int) -> None:
        self._check(samples)
        self.samples, self.seed = samples, seed
        self.epoch = 0
        self.position = 0
        self._batches = self._plan(0)

    def _check(self, samples: Sequence[Any]) -> None:
        _check_samples(samples)

    def _plan(self, epoch: int) -> list[list[Any]]:
        raise NotImplementedError

    def _collate(self, batch: list[Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self._batches)

    def _next_planned(self) -> list[Any]:
        if self.position >= len(self._batches):
            self.epoch += 1
            self.position = 0
            self._batches = self._plan(self.epoch)
        batch = self._batches[self.position]
        self.position += 1
        return batch

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self._collate(self._next_planned())

    def skip_batch(self) -> None:
        """Move past the next batch without collating it (another process trains on it)."""
        self._next_planned()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "n_samples": len(self.samples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("n_samples", len(self.samples)) != len(self.samples):
            raise LargeForgeError(
                "the checkpoint's data position does not fit this data set "
                f"({state['n_samples']} samples then, {len(self.samples)} now)"
            )
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._batches = self._plan(self.epoch)


class PaddedBatches(EpochBatches):
    """Batches of `batch_size` samples, right-padded to the longest in the batch (labels -100 and
    attention_mask 0 on padding). With `group_by_length`, each epoch's shuffled order is cut
    into mega-chunks of `mega_batch_mult * batch_size` samples, each sorted by length (longest
    first) and cut into batches, as transformers' LengthGroupedSampler does, so a batch holds
    samples of similar length and little padding; the batch with the longest sample comes
    first, so running out of memory shows at once."""

    def __init__(
        self,
        samples: Sequence[Sample],
        batch_size: int,
        seed: int,
        *,
        pad_id: int,
        group_by_length: bool = True,
        mega_batch_mult: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise LargeForgeError(f"batch size must be at least 1, not {batch_size}")
        self.batch_size, self.pad_id, self.group_by_length = batch_size, pad_id, group_by_length
        if mega_batch_mult is None:  # LengthGroupedSampler's default
            mega_batch_mult = max(1, min(len(samples) // (batch_size * 4), 50))
        self.mega_batch_mult = mega_batch_mult
        super().__init__(samples, seed)

    def _plan(self, epoch: int) -> list[list[int]]:
        order = seeded_permutation(len(self.samples), self.seed + epoch)
        if not self.group_by_length:
            return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        size = self.mega_batch_mult * self.batch_size
        batches: list[list[int]] = []
        for start in range(0, len(order), size):
            chunk = sorted(order[start:start + size], key=lambda i: -len(self.samples[i][0]))
            batches.extend(
                chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)
            )
        longest = max(range(len(batches)), key=lambda b: len(self.samples[batches[b][0]][0]))
        batches[0], batches[longest] = batches[longest], batches[0]
        return batches

    def _collate(self, batch: list[int]) -> dict[str, torch.Tensor]:
        width = max(len(self.samples[i][0]) for i in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids, lab = self.samples[i]
            n = len(ids)
            input_ids[row, :n] = torch.as_tensor(list(ids), dtype=torch.long)
            labels[row, :n] = torch.as_tensor(list(lab), dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class PackedBatches(EpochBatches):
    """Rows of `seq_len` tokens, each holding several whole samples (filled in each epoch's
    shuffled order; a sample that does not fit in the current row starts the next), right-padded
    with `pad_id`. A sample longer than `seq_len` is cut to `seq_len` (counted in `truncated`).

    A batch has `input_ids`, `labels` (-100 on padding and on the first token of every sample)
    and `position_ids` (restarting at 0 for every sample and for the padding), plus with
    `mask="4d"` an `attention_mask` [batch, 1, seq_len, seq_len] of booleans."""

    def __init__(
        self,
        samples: Sequence[Sample],
        seq_len: int,
        batch_size: int,
        seed: int,
        *,
        pad_id: int,
        mask: str = "positions",
    ) -> None:
        if batch_size < 1 or seq_len < 2:
            raise LargeForgeError(
                f"packing needs batch size >= 1 and seq_len >= 2 (got {batch_size}, {seq_len})"
            )
        if mask not in ("positions", "4d"):
            raise LargeForgeError(f"mask must be 'positions' or '4d', not {mask!r}")
        self.seq_len, self.batch_size, self.pad_id, self.mask = seq_len, batch_size, pad_id, mask
        self.truncated = sum(1 for ids, _ in samples if len(ids) > seq_len)
        super().__init__(samples, seed)

    def _length(self, i: int) -> int:
        return min(len(self.samples[i][0]), self.seq_len)

    def _plan(self, epoch: int) -> list[list[list[int]]]:
        rows: list[list[int]] = []
        row: list[int] = []
        used = 0
        for i in seeded_permutation(len(self.samples), self.seed + epoch):
            n = self._length(i)
            if row and used + n > self.seq_len:
                rows.append(row)
                row, used = [], 0
            row.append(i)
            used += n
        if row:
            rows.append(row)
        return [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    def _collate(self, batch: list[list[int]]) -> dict[str, torch.Tensor]:
        shape = (len(batch), self.seq_len)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        for r, row in enumerate(batch):
            at = 0
            for i in row:
                n = self._length(i)
                ids, lab = self.samples[i]
                input_ids[r, at:at + n] = torch.as_tensor(list(ids[:n]), dtype=torch.long)
                labels[r, at + 1:at + n] = torch.as_tensor(list(lab[1:n]), dtype=torch.long)
                position_ids[r, at:at + n] = torch.arange(n)
                at += n
            position_ids[r, at:] = torch.arange(self.seq_len - at)
        out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if self.mask == "4d":
            out["attention_mask"] = block_causal_mask(position_ids)
        return out


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Per token, the index of its sample within the row: a new sample starts wherever the
    position does not follow the previous one (as transformers' find_packed_sequence_indices)."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[batch, 1, seq, seq] booleans: a token may attend to itself and the earlier tokens of
    its own sample only."""
    docs = document_ids(position_ids)
    seq = position_ids.size(1)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    same = docs[:, :, None] == docs[:, None, :]
    return (same & causal)[:, None]
