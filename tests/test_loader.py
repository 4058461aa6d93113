"""Pretraining batches (random windows, resumable) and the fixed evaluation batches."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from largeforge.data.loader import PretrainBatches, eval_batches
from largeforge.data.pretrain import TokenArray
from largeforge.errors import LargeForgeError


def tokens(n, pieces=3):
    """Token i has value i, spread over several segments (as over shards)."""
    values = np.arange(n, dtype=np.uint32)
    return TokenArray(list(np.array_split(values, pieces)))


def window_index(x_row, seq_len):
    start = int(x_row[0])
    assert start % seq_len == 0
    return start // seq_len


def test_shapes_and_shift():
    batches = PretrainBatches(tokens(1001, pieces=7), seq_len=10, batch_size=4, seed=0)
    assert batches.n_windows == 100
    for _ in range(5):
        x, y = batches.next_batch()
        assert x.shape == y.shape == (4, 10)
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        # consecutive tokens of one window starting at a multiple of seq_len
        for row_x, row_y in zip(x, y, strict=True):
            start = int(row_x[0])
            assert start % 10 == 0
            assert row_x.tolist() == list(range(start, start + 10))
            assert row_y.tolist() == list(range(start + 1, start + 11))


def test_each_window_once_per_epoch():
    seq_len, batch = 8, 5
    batches = PretrainBatches(tokens(8 * 40 + 1), seq_len, batch, seed=3)
    assert batches.n_windows == 40
    epochs = []
    for _ in range(3):
        seen = []
        for _ in range(40 // batch):
            x, _ = batches.next_batch()
            seen += [window_index(row, seq_len) for row in x]
        epochs.append(seen)
        assert sorted(seen) == list(range(40))
    assert epochs[0] != epochs[1] != epochs[2]  # a fresh order each epoch
    assert epochs[0] != list(range(40))  # shuffled


def test_epoch_boundary_inside_a_batch():
    seq_len = 4
    batches = PretrainBatches(tokens(4 * 7 + 1), seq_len, batch_size=3, seed=1)
    assert batches.n_windows == 7
    seen = []
    for _ in range(14):  # 42 windows = 6 full epochs, with batches straddling epochs
        x, _ = batches.next_batch()
        seen += [window_index(row, seq_len) for row in x]
    for epoch in range(6):
        assert sorted(seen[epoch * 7:(epoch + 1) * 7]) == list(range(7))
    assert batches.epoch == 5 and batches.position == 7


def test_last_token_is_used_only_as_a_target():
    # 21 tokens, seq_len 10: two windows [0..10] and [10..20]
    batches = PretrainBatches(tokens(21), seq_len=10, batch_size=2, seed=0)
    x, y = batches.next_batch()
    assert sorted(int(r[-1]) for r in y) == [10, 20]


def test_state_dict_resumes_exactly():
    data = tokens(6 * 50 + 1)
    first = PretrainBatches(data, 6, 7, seed=11)
    for _ in range(9):  # crosses an epoch boundary (50 windows, 63 taken)
        first.next_batch()
    state = first.state_dict()
    assert state == {"epoch": 1, "position": 13, "seed": 11, "n_windows": 50}
    expected = [first.next_batch() for _ in range(12)]
    fresh = PretrainBatches(data, 6, 7, seed=999)  # the seed comes from the state
    fresh.load_state_dict(state)
    for x_want, y_want in expected:
        x, y = fresh.next_batch()
        assert torch.equal(x, x_want) and torch.equal(y, y_want)


def test_state_dict_at_start_and_after_whole_epoch():
    data = tokens(5 * 10 + 1)
    a = PretrainBatches(data, 5, 5, seed=4)
    b = PretrainBatches(data, 5, 5, seed=4)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    a.next_batch()  # the end of epoch 0 exactly
    state = a.state_dict()
    assert state["position"] == 10
    c = PretrainBatches(data, 5, 5, seed=0)
    c.load_state_dict(state)
    assert torch.equal(a.next_batch()[0], c.next_batch()[0])


def test_load_state_for_another_corpus_fails():
    state = PretrainBatches(tokens(101), 10, 2, seed=0).state_dict()
    other = PretrainBatches(tokens(201), 10, 2, seed=0)
    with pytest.raises(LargeForgeError, match="10 windows then, 20 now"):
        other.load_state_dict(state)


def test_seeds_give_different_orders_and_same_seed_same_order():
    data = tokens(4 * 64 + 1)

    def order(seed):
        batches = PretrainBatches(data, 4, 16, seed)
        return [window_index(row, 4) for _ in range(4) for row in batches.next_batch()[0]]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == sorted(order(1)) == list(range(64))


@pytest.mark.parametrize(("n", "seq_len"), [(0, 4), (1, 4), (4, 4), (10, 16)])
def test_too_short_data(n, seq_len):
    with pytest.raises(LargeForgeError, match=f"holds {n} tokens.*data.seq_len {seq_len}"):
        PretrainBatches(tokens(n, pieces=1) if n else TokenArray([]), seq_len, 2, seed=0)


def test_exactly_one_window():
    batches = PretrainBatches(tokens(5, pieces=2), seq_len=4, batch_size=3, seed=0)
    x, y = batches.next_batch()
    assert x.tolist() == [[0, 1, 2, 3]] * 3 and y.tolist() == [[1, 2, 3, 4]] * 3


# --- eval_batches ------------------------------------------------------------------------------


def test_eval_batches_deterministic_and_bounded():
    data = tokens(10 * 100 + 1)
    batches = eval_batches(data, seq_len=10, batch_size=4, max_batches=5)
    assert len(batches) == 5
    starts = [int(row[0]) for x, _ in batches for row in x]
    assert len(starts) == len(set(starts)) == 20
    assert starts == sorted(starts)
    assert starts[0] == 0 and starts[-1] == 990  # spread over the whole split
    for x, y in batches:
        assert x.shape == y.shape == (4, 10)
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(y, x + 1)


def test_eval_batches_same_twice():
    data = tokens(10 * 37 + 5)
    one, two = eval_batches(data, 10, 3, 4), eval_batches(data, 10, 3, 4)
    assert len(one) == len(two) == 4
    for (xa, ya), (xb, yb) in zip(one, two, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_eval_batches_keep_last_partial_batch():
    data = tokens(10 * 10 + 1)  # 10 windows
    batches = eval_batches(data, seq_len=10, batch_size=4, max_batches=100)
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    starts = sorted(int(row[0]) for x, _ in batches for row in x)
    assert starts == list(range(0, 100, 10))  # every window, once


def test_eval_batches_short_and_empty():
    assert eval_batches(TokenArray([]), 10, 4, 5) == []
    assert eval_batches(tokens(1, pieces=1), 10, 4, 5) == []
    assert eval_batches(tokens(100), 10, 4, 0) == []
    (batch,) = eval_batches(tokens(6, pieces=2), seq_len=10, batch_size=4, max_batches=5)
    x, y = batch
    assert x.tolist() == [[0, 1, 2, 3, 4]] and y.tolist() == [[1, 2, 3, 4, 5]]


def test_eval_windows_do_not_read_past_the_end():
    data = tokens(10 * 20 + 1)
    batches = eval_batches(data, seq_len=10, batch_size=8, max_batches=3)
    counts = Counter(int(row[-1]) for _, y in batches for row in y)
    assert max(counts) <= 200 and all(v == 1 for v in counts.values())
