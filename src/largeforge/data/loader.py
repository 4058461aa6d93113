"""Batches for pretraining: random windows over a token array, resumable to the exact batch."""

from __future__ import annotations

from typing import Any

import torch

from largeforge.data.pretrain import TokenArray
from largeforge.errors import LargeForgeError


class PretrainBatches:
    """Non-overlapping windows of `seq_len + 1` tokens at stride `seq_len`, visited in a fresh
    random order each epoch (the order of epoch e comes from `seed + e`, so it can be rebuilt
    from the state alone). `x` is a window's first seq_len tokens, `y` the same shifted by one."""

    def __init__(self, tokens: TokenArray, seq_len: int, batch_size: int, seed: int) -> None:
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise LargeForgeError(
                f"the training split holds {len(tokens)} tokens, too few for one window of "
                f"data.seq_len {seq_len}; add data or lower data.seq_len"
            )
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def __len__(self) -> int:
        """Batches per epoch (the last one borrows windows from the next epoch)."""
        return -(-self.n_windows // self.batch_size)

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n_windows, generator=generator)

    def _next_window(self) -> int:
        """The start of the next window in the visiting order."""
        if self.position >= self.n_windows:
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        start = int(self._order[self.position]) * self.seq_len
        self.position += 1
        return start

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.tokens.window(self._next_window(), self.seq_len + 1)
                for _ in range(self.batch_size)]
        block = torch.stack(rows)
        return block[:, :-1].contiguous(), block[:, 1:].contiguous()

    def skip_batch(self) -> None:
        """Move past the next batch without reading it (another process trains on it)."""
        for _ in range(self.batch_size):
            self._next_window()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "n_windows": self.n_windows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("n_windows", self.n_windows) != self.n_windows:
            raise LargeForgeError(
                "the checkpoint's data position does not fit this corpus "
                f"({state['n_windows']} windows then, {self.n_windows} now)"
            )
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._order = self._permutation(self.epoch)


def eval_batches(
    tokens: TokenArray, seq_len: int, batch_size: int, max_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed evaluation set: up to `max_batches * batch_size` windows spread evenly over the
    split (the last batch may be smaller). A split shorter than one window gives one shorter
    window; an empty split gives no batches."""
    n = len(tokens)
    if n < 2:
        return []
    length = min(seq_len, n - 1)
    n_windows = (n - 1) // length
    count = min(n_windows, max_batches * batch_size)
    if count < 1:
        return []
    starts = torch.linspace(0, (n_windows - 1), count).round().long().unique() * length
    windows = [tokens.window(int(s), length + 1) for s in starts]
    batches = []
    for i in range(0, len(windows), batch_size):
        block = torch.stack(windows[i:i + batch_size])
        batches.append((block[:, :-1].contiguous(), block[:, 1:].contiguous()))
    return batches
