"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p.

Each processor follows the rule of its `transformers` counterpart exactly
(`RepetitionPenaltyLogitsProcessor`, `TemperatureLogitsWarper`, `TopKLogitsWarper`,
`TopPLogitsWarper`), and `sample_next_token` applies them in the order `transformers.generate`
does, so a seeded run here draws the same token as the same settings would there.
All functions take logits of shape [batch, vocab] and return new tensors (inputs are not modified).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from largeforge.config import SEED_MAX, SEED_MIN
from largeforge.errors import LargeForgeError


@dataclass
class SamplingParams:
    """How to pick tokens. `temperature == 0` means greedy (always the most likely token)."""

    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    seed: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise LargeForgeError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature >= 0:  # also rejects NaN
            raise LargeForgeError(
                f"temperature must be >= 0 (0 means greedy), got {self.temperature}"
            )
        if self.top_k < 0:
            raise LargeForgeError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LargeForgeError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise LargeForgeError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")
        if not self.repetition_penalty > 0:
            raise LargeForgeError(
                f"repetition_penalty must be > 0 (1.0 turns it off), got {self.repetition_penalty}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: Tensor, previous_ids: Tensor, penalty: float) -> Tensor:
    """CTRL rule (Keskar et al. 2019): for every token already in `previous_ids`, divide its
    logit by `penalty` when positive and multiply it when negative, so penalty > 1 always makes
    the token less likely. Each token is penalised once, however often it occurred."""
    if penalty == 1.0 or previous_ids.numel() == 0:
        return logits
    previous_ids = previous_ids.to(logits.device)
    seen = torch.gather(logits, 1, previous_ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    # scatter with the same value for repeated ids is harmless: every copy is identical.
    return logits.scatter(1, previous_ids, seen)


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Divide by the temperature (> 0): below 1 sharpens, above 1 flattens the distribution."""
    if temperature == 1.0:
        return logits
    return logits / temperature


def filter_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the `k` largest logits per row (ties with the k-th are kept too); `k <= 0` is off."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def filter_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probabilities add up
    to at least `p`. The most likely token is always kept, so a tiny `p` means greedy."""
    if p >= 1.0:
        return logits
    # Sorted ascending, a token may go when all tokens less likely than it *and* itself together
    # hold at most 1 - p of the mass: what remains then still holds at least p.
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: Tensor, previous_ids: Tensor, params: SamplingParams) -> Tensor:
    """All processors in `transformers`' order: repetition penalty, temperature, top-k, top-p.

    In greedy mode only the repetition penalty matters (the others keep the top token on top).
    """
    logits = apply_repetition_penalty(logits, previous_ids, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = apply_temperature(logits, params.temperature)
    logits = filter_top_k(logits, params.top_k)
    return filter_top_p(logits, params.top_p)


def sample_next_token(
    logits: Tensor,
    previous_ids: Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The next token for each row: logits [batch, vocab], previous ids [batch, seq] -> [batch].

    Greedy (argmax) when `params.temperature == 0`, else one draw from the processed
    distribution using `generator` (so a seeded generator gives reproducible draws).
    """
    # Work in fp32: softmax and cumulative sums in bf16/fp16 are too coarse for top-p.
    logits = process_logits(logits.float(), previous_ids, params)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
