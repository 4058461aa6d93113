"""Padded and packed batches for instruction data: exact packing, padding, resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from largeforge.data.instruct_batches import (
    IGNORE_INDEX,
    PackedBatches,
    PaddedBatches,
    block_causal_mask,
    document_ids,
)
from largeforge.errors import LargeForgeError
from largeforge.models import ModelConfig, build_model

VOCAB = 300
PAD = 0


def make_samples(n: int = 24, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Samples of 3..40 tokens whose first part (the 'prompt') has no targets."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        length = int(torch.randint(3, 41, (1,), generator=g))
        ids = torch.randint(4, VOCAB, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length, (1,), generator=g))
        samples.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return samples


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                         vocab_size=VOCAB, max_seq_len=128)
    return build_model(config).float().eval()


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over label tokens, and their count (labels shift by one,
    as in transformers' causal LM loss)."""
    logits, labels = logits[..., :-1, :].reshape(-1, logits.size(-1)), labels[..., 1:].reshape(-1)
    total = F.cross_entropy(logits.double(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return float(total), int((labels != IGNORE_INDEX).sum())


def unpacked(model: torch.nn.Module, sample: tuple[list[int], list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([sample[0]]), use_cache=False).logits[0]


@pytest.mark.parametrize("mask", ["positions", "4d"])
def test_packed_loss_and_logits_equal_unpacked(mask, model) -> None:
    samples = make_samples()
    batches = PackedBatches(samples, seq_len=96, batch_size=2, seed=3, pad_id=PAD, mask=mask)
    assert len(batches) >= 2
    assert any(len(row) > 1 for plan in batches._batches for row in plan)
    for b in range(len(batches)):
        plan = batches._batches[b]
        batch = batches.next_batch()
        with torch.no_grad():
            out = model(**batch, use_cache=False)
        logits = out.logits
        packed_total, packed_count = loss_sum(logits, batch["labels"])
        ref_total, ref_count = 0.0, 0
        for r, row in enumerate(plan):
            at = 0
            for i in row:
                n = len(samples[i][0])
                ref = unpacked(model, samples[i])
                torch.testing.assert_close(logits[r, at:at + n], ref, atol=1e-5, rtol=0)
                total, count = loss_sum(ref, torch.tensor(samples[i][1]))
                ref_total, ref_count = ref_total + total, ref_count + count
                at += n
        assert packed_count == ref_count > 0
        assert abs(packed_total / packed_count - ref_total / ref_count) < 1e-5
        assert abs(float(out.loss) - ref_total / ref_count) < 1e-5  # transformers' own loss


def test_packed_rows_are_whole_samples_with_no_cross_sample_targets() -> None:
    samples = make_samples(40, seed=1)
    batches = PackedBatches(samples, seq_len=64, batch_size=3, seed=0, pad_id=PAD)
    seen = []
    for b in range(len(batches)):
        plan = batches._batches[b]
        batch = batches.next_batch()
        assert set(batch) == {"input_ids", "labels", "position_ids"}
        assert batch["input_ids"].shape == (len(plan), 64)
        for r, row in enumerate(plan):
            at = 0
            for i in row:
                ids, labels = samples[i]
                n = len(ids)
                assert batch["input_ids"][r, at:at + n].tolist() == ids
                assert batch["position_ids"][r, at:at + n].tolist() == list(range(n))
                # The first token of a sample is never the target of the sample before it.
                assert batch["labels"][r, at] == IGNORE_INDEX
                assert batch["labels"][r, at + 1:at + n].tolist() == labels[1:]
                at += n
            assert (batch["input_ids"][r, at:] == PAD).all()
            assert (batch["labels"][r, at:] == IGNORE_INDEX).all()
            seen.extend(row)
    assert sorted(seen) == list(range(len(samples)))  # an epoch holds every sample once
    assert batches.epoch == 0


def test_block_causal_mask() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert document_ids(positions).tolist() == [[0, 0, 0, 1, 1, 2]]
    mask = block_causal_mask(positions)[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]


def test_over_long_samples_are_cut_and_counted() -> None:
    samples = [(list(range(4, 20)), list(range(4, 20))), ([5, 6, 7], [5, 6, 7])]
    batches = PackedBatches(samples, seq_len=8, batch_size=4, seed=0, pad_id=PAD)
    assert batches.truncated == 1
    batch = batches.next_batch()
    assert batch["input_ids"].shape == (2, 8)


def test_padded_batches_pad_right_and_match_unpacked_loss(model) -> None:
    samples = make_samples(12, seed=2)
    batches = PaddedBatches(samples, batch_size=4, seed=0, pad_id=PAD)
    for b in range(len(batches)):
        plan = batches._batches[b]
        batch = batches.next_batch()
        assert set(batch) == {"input_ids", "labels", "attention_mask"}
        with torch.no_grad():
            logits = model(**batch, use_cache=False).logits
        for r, i in enumerate(plan):
            n = len(samples[i][0])
            assert batch["input_ids"][r, :n].tolist() == samples[i][0]
            assert batch["labels"][r, :n].tolist() == samples[i][1]
            assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (logits.size(1) - n)
            assert (batch["labels"][r, n:] == IGNORE_INDEX).all()
            assert (batch["input_ids"][r, n:] == PAD).all()
            torch.testing.assert_close(logits[r, :n], unpacked(model, samples[i]), atol=1e-5,
                                       rtol=0)


def padding_per_epoch(batches: PaddedBatches) -> int:
    pads = 0
    for _ in range(len(batches)):
        pads += int((batches.next_batch()["attention_mask"] == 0).sum())
    return pads


def test_length_grouping_reduces_padding() -> None:
    samples = make_samples(200, seed=4)
    grouped = PaddedBatches(samples, batch_size=8, seed=0, pad_id=PAD)
    plain = PaddedBatches(samples, batch_size=8, seed=0, pad_id=PAD, group_by_length=False)
    assert grouped.mega_batch_mult == 6
    # The longest sample comes first; every sample once per epoch.
    first = grouped._batches[0]
    assert max(len(samples[i][0]) for i in first) == max(len(s[0]) for s in samples)
    assert sorted(i for b in grouped._batches for i in b) == list(range(200))
    assert padding_per_epoch(grouped) < padding_per_epoch(plain) / 3


def make(kind: str, samples: list, seed: int = 7) -> PaddedBatches | PackedBatches:
    if kind == "padded":
        return PaddedBatches(samples, batch_size=3, seed=seed, pad_id=PAD)
    return PackedBatches(samples, seq_len=48, batch_size=2, seed=seed, pad_id=PAD)


@pytest.mark.parametrize("kind", ["padded", "packed"])
def test_resume_reproduces_batches_exactly(kind) -> None:
    samples = make_samples(30, seed=5)
    first = make(kind, samples)
    per_epoch = len(first)
    stop = per_epoch + 2  # into the second epoch, whose order differs from the first
    for _ in range(stop):
        first.next_batch()
    state = first.state_dict()
    assert state["epoch"] == 1 and state["position"] == 2
    expected = [first.next_batch() for _ in range(per_epoch + 3)]
    resumed = make(kind, samples, seed=999)  # the seed comes from the state
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_batch()
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key
    # Epochs are shuffled differently.
    fresh = make(kind, samples)
    assert fresh._plan(0) != fresh._plan(1)


def test_resume_into_other_data_and_bad_input_fail() -> None:
    state = make("padded", make_samples(30)).state_dict()
    with pytest.raises(LargeForgeError, match="does not fit"):
        make("padded", make_samples(31)).load_state_dict(state)
    with pytest.raises(LargeForgeError, match="no instruction samples"):
        PaddedBatches([], batch_size=2, seed=0, pad_id=PAD)
    with pytest.raises(LargeForgeError, match="labels"):
        PackedBatches([([1, 2], [1])], seq_len=8, batch_size=1, seed=0, pad_id=PAD)
    with pytest.raises(LargeForgeError, match="mask"):
        PackedBatches([([1, 2], [1, 2])], seq_len=8, batch_size=1, seed=0, pad_id=PAD, mask="x")


@pytest.mark.parametrize("kind", ["packed", "padded"])
def test_instruction_loss_equals_transformers_loss(kind, model) -> None:
    from largeforge.training.objectives import instruction_loss

    samples = make_samples(12, seed=5)
    batches = (PackedBatches(samples, seq_len=96, batch_size=2, seed=0, pad_id=PAD)
               if kind == "packed" else PaddedBatches(samples, 4, seed=0, pad_id=PAD))
    batch = batches.next_batch()
    with torch.no_grad():
        ours, _ = instruction_loss(model, batch)
        theirs = model(**batch, use_cache=False).loss
    assert abs(float(ours) - float(theirs)) < 1e-5
