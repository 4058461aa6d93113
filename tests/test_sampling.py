"""Sampling processors: parity with the reference implementations in `transformers`."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from largeforge.errors import LargeForgeError
from largeforge.inference.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    filter_top_k,
    filter_top_p,
    process_logits,
    sample_next_token,
)

BATCH, VOCAB = 4, 97


@pytest.fixture
def logits() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, VOCAB, generator=g) * 3


@pytest.fixture
def previous_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    # Repeated ids on purpose: each token must be penalised once, not once per occurrence.
    ids = torch.randint(0, VOCAB, (BATCH, 12), generator=g)
    ids[:, 5] = ids[:, 0]
    return ids


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": -1.0},
        {"max_new_tokens": -1},
    ],
)
def test_params_reject_bad_values(kwargs: dict) -> None:
    with pytest.raises(LargeForgeError) as info:
        SamplingParams(**kwargs)
    assert next(iter(kwargs)) in str(info.value)


def test_params_defaults() -> None:
    params = SamplingParams()
    assert (params.max_new_tokens, params.temperature, params.top_k, params.top_p) == (
        128, 0.8, 0, 1.0
    )
    assert not params.greedy and SamplingParams(temperature=0).greedy


@pytest.mark.parametrize("penalty", [0.7, 1.0, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(logits, previous_ids, penalty: float) -> None:
    reference = RepetitionPenaltyLogitsProcessor(penalty)(previous_ids, logits.clone())
    ours = apply_repetition_penalty(logits, previous_ids, penalty)
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_repetition_penalty_leaves_input_alone(logits, previous_ids) -> None:
    before = logits.clone()
    apply_repetition_penalty(logits, previous_ids, 1.5)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_temperature_matches_transformers(logits, temperature: float) -> None:
    reference = TemperatureLogitsWarper(temperature)(None, logits.clone())
    torch.testing.assert_close(apply_temperature(logits, temperature), reference)


@pytest.mark.parametrize("k", [1, 5, 40, VOCAB, VOCAB + 10])
def test_top_k_matches_transformers(logits, k: int) -> None:
    reference = TopKLogitsWarper(top_k=k)(None, logits.clone())
    assert torch.equal(filter_top_k(logits, k), reference)


def test_top_k_zero_is_off(logits) -> None:
    assert torch.equal(filter_top_k(logits, 0), logits)


@pytest.mark.parametrize("p", [0.01, 0.2, 0.5, 0.9, 0.999, 1.0])
def test_top_p_matches_transformers(logits, p: float) -> None:
    reference = TopPLogitsWarper(top_p=p)(None, logits.clone())
    assert torch.equal(filter_top_p(logits, p), reference)


def test_top_p_always_keeps_the_top_token(logits) -> None:
    kept = filter_top_p(logits, 1e-9)
    assert torch.isfinite(kept).sum(dim=-1).tolist() == [1] * BATCH
    assert torch.equal(kept.argmax(-1), logits.argmax(-1))


def test_greedy_is_argmax_after_penalty(logits, previous_ids) -> None:
    params = SamplingParams(temperature=0, repetition_penalty=1.5)
    expected = apply_repetition_penalty(logits, previous_ids, 1.5).argmax(-1)
    assert torch.equal(sample_next_token(logits, previous_ids, params), expected)


def test_top_k_one_is_greedy(logits, previous_ids) -> None:
    params = SamplingParams(temperature=1.3, top_k=1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next_token(logits, previous_ids, params, g), logits.argmax(-1))


def test_pipeline_matches_transformers_processors(logits, previous_ids) -> None:
    """Processors in transformers' order, then the same seeded draw, give the same tokens."""
    params = SamplingParams(temperature=0.7, top_k=30, top_p=0.85, repetition_penalty=1.2)
    reference = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.2),
            TemperatureLogitsWarper(0.7),
            TopKLogitsWarper(30),
            TopPLogitsWarper(0.85),
        ]
    )(previous_ids, logits.clone())
    assert torch.equal(process_logits(logits, previous_ids, params), reference)
    for seed in range(5):
        expected = torch.multinomial(
            reference.softmax(-1), 1, generator=torch.Generator().manual_seed(seed)
        ).squeeze(1)
        got = sample_next_token(
            logits, previous_ids, params, torch.Generator().manual_seed(seed)
        )
        assert torch.equal(got, expected)


def test_seeded_sampling_is_reproducible_and_only_draws_kept_tokens(logits, previous_ids) -> None:
    params = SamplingParams(temperature=1.0, top_k=3)
    draws = [
        sample_next_token(logits, previous_ids, params, torch.Generator().manual_seed(s))
        for s in (7, 7)
    ]
    assert torch.equal(draws[0], draws[1])
    allowed = torch.topk(logits, 3).indices
    for seed in range(20):
        token = sample_next_token(logits, previous_ids, params, torch.Generator().manual_seed(seed))
        assert (allowed == token[:, None]).any(dim=-1).all()
