"""Perplexity: exp of the mean negative log-likelihood per scored token.

Two kinds of data:

- Plain text is tokenised as pretraining tokenises it (each document without special tokens,
  literal special-token strings kept as text, EOS after every document; BOS in front where the
  tokenizer expects one) into one stream, scored over windows of the model's context that
  move by `stride` tokens. Each window scores only the tokens the previous one did not, so
  every token after the first is scored exactly once, with at least `max_length - stride`
  tokens of context once the first window is passed (the method of the Hugging Face
  perplexity guide).
- Instruction and chat data is rendered with the chat template exactly as training renders it
  (`chat_templates.render_batch_for_training`): only assistant tokens are scored, the prompt's
  labels are -100. Conversations longer than the context are cut at its end, as training's
  default `overlong: truncate` does, and counted.

The result is token-weighted: the sum of every scored token's loss over the number of scored
tokens, not a mean of per-window or per-example means.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from largeforge.chat_templates import (
    IGNORE_INDEX,
    render_batch_for_training,
    tokenizer_adds_bos,
)
from largeforge.errors import LargeForgeError
from largeforge.inference.generate import context_length

Sample = tuple[list[int], list[int]]  # (input ids, labels aligned with them; -100 = not scored)

# Most tokens in one forward pass: the fp32 logits of a batch are tokens x vocabulary x 4 bytes
# (about 0.5 GiB at 4,096 tokens and a 32k vocabulary).
MAX_BATCH_TOKENS = 4096


@dataclass
class PerplexityResult:
    loss: float  # mean negative log-likelihood per scored token, in nats
    perplexity: float
    tokens: int  # tokens scored
    sequences: int  # documents or conversations read
    truncated: int = 0  # conversations cut at the context length
    skipped: int = 0  # conversations with no assistant token to score


def default_max_length(model: PreTrainedModel) -> int:
    length = context_length(model)
    if length is None:
        raise LargeForgeError(
            "the model's config does not say its context length (max_position_embeddings); "
            "give max_length"
        )
    return int(length)


def score_samples(
    model: PreTrainedModel, samples: Sequence[Sample], *, batch_size: int = 8
) -> tuple[float, int]:
    """(sum of the token losses, number of scored tokens) over (ids, labels) samples.

    Labels are aligned with the ids, as `transformers` takes them: the logits at position t
    are scored against label t + 1. Samples are right-padded into batches of at most
    `batch_size` rows and about MAX_BATCH_TOKENS tokens; padding is masked and never scored.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(samples)), key=lambda i: len(samples[i][0]), reverse=True)
    total = 0.0
    count = 0
    start = 0
    was_training = model.training
    model.eval()
    try:
        while start < len(order):
            longest = len(samples[order[start]][0])
            rows = max(1, min(batch_size, MAX_BATCH_TOKENS // max(longest, 1)))
            batch = [samples[i] for i in order[start:start + rows]]
            start += rows
            loss_sum, scored = _score_batch(model, batch, device)
            total += loss_sum
            count += scored
    finally:
        model.train(was_training)
    return total, count


def _score_batch(
    model: PreTrainedModel, batch: Sequence[Sample], device: torch.device
) -> tuple[float, int]:
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, (ids, row_labels) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, : len(ids)] = torch.tensor(row_labels, dtype=torch.long)
        mask[row, : len(ids)] = 1
    targets = labels[:, 1:].to(device)
    scored = int((targets != IGNORE_INDEX).sum())
    if scored == 0:
        return 0.0, 0
    with torch.inference_mode():
        logits = model(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False
        ).logits
        loss = F.cross_entropy(
            logits[:, :-1, :].float().reshape(-1, logits.size(-1)),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
    return float(loss), scored


def _result(total: float, count: int, sequences: int, **extra: int) -> PerplexityResult:
    if count == 0:
        raise LargeForgeError("no token to score: the data is too short")
    loss = total / count
    return PerplexityResult(loss, math.exp(min(loss, 700.0)), count, sequences, **extra)


# --- plain text ------------------------------------------------------------------------------


def text_token_stream(tokenizer: Any, documents: Iterable[str]) -> list[int]:
    """The documents as one token stream, encoded as pretraining encodes them (no special
    tokens, literal "</s>" kept as text, EOS after each document), with BOS in front where
    the tokenizer puts one (Llama-style models are trained with it)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise LargeForgeError("the tokenizer has no EOS token to separate documents with")
    stream: list[int] = [int(tokenizer.bos_token_id)] if tokenizer_adds_bos(tokenizer) else []
    batch: list[str] = []

    def flush() -> None:
        encoded = tokenizer(batch, add_special_tokens=False, split_special_tokens=True)
        for ids in encoded["input_ids"]:
            stream.extend(int(t) for t in ids)
            stream.append(int(eos))
        batch.clear()

    for document in documents:
        batch.append(document)
        if len(batch) >= 256:
            flush()
    if batch:
        flush()
    return stream


def sliding_windows(ids: Sequence[int], max_length: int, stride: int) -> list[Sample]:
    """(ids, labels) windows of at most `max_length` tokens, starting every `stride` tokens;
    in each, only the tokens no earlier window scored are labelled."""
    if max_length < 2:
        raise LargeForgeError(f"the window must hold at least 2 tokens, got {max_length}")
    # A window predicts its tokens from the second on, so windows must overlap by at least one
    # token for the token at a window's start to be scored.
    if not 0 < stride < max_length:
        raise LargeForgeError(
            f"stride must be in 1..{max_length - 1} (less than the window), got {stride}"
        )
    windows: list[Sample] = []
    previous_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        new = end - previous_end  # tokens this window scores
        window = [int(t) for t in ids[begin:end]]
        labels = [IGNORE_INDEX] * (len(window) - new) + window[len(window) - new:]
        windows.append((window, labels))
        previous_end = end
        if end == len(ids):
            break
    return windows


def ids_perplexity(
    model: PreTrainedModel,
    ids: Sequence[int],
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    sequences: int = 1,
) -> PerplexityResult:
    """Perplexity of one token stream over sliding windows (`max_length`: the model's context;
    `stride`: half of it)."""
    max_length = max_length or default_max_length(model)
    stride = stride or max(1, max_length // 2)
    total, count = score_samples(
        model, sliding_windows(ids, max_length, stride), batch_size=batch_size
    )
    return _result(total, count, sequences)


def text_perplexity(
    model: PreTrainedModel,
    tokenizer: Any,
    documents: Sequence[str],
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
) -> PerplexityResult:
    """Perplexity of plain-text documents (see the module's notes)."""
    if not documents:
        raise LargeForgeError("no document to score")
    stream = text_token_stream(tokenizer, documents)
    return ids_perplexity(model, stream, max_length=max_length, stride=stride,
                          batch_size=batch_size, sequences=len(documents))


# --- instruction and chat data -----------------------------------------------------------------


def instruction_samples(
    tokenizer: Any,
    conversations: Sequence[list[dict[str, str]]],
    template: str,
    max_length: int,
) -> tuple[list[Sample], int, int]:
    """(samples, number cut at `max_length`, number without an assistant token to score),
    rendered exactly as training renders them."""
    samples: list[Sample] = []
    truncated = skipped = 0
    for start in range(0, len(conversations), 512):
        chunk = list(conversations[start:start + 512])
        for ids, labels in render_batch_for_training(tokenizer, chunk, template):
            if len(ids) > max_length:
                truncated += 1
                ids, labels = ids[:max_length], labels[:max_length]
            if all(label == IGNORE_INDEX for label in labels[1:]):
                skipped += 1
                continue
            samples.append((ids, labels))
    return samples, truncated, skipped


def instruction_perplexity(
    model: PreTrainedModel,
    tokenizer: Any,
    conversations: Sequence[list[dict[str, str]]],
    template: str,
    *,
    max_length: int | None = None,
    batch_size: int = 8,
) -> PerplexityResult:
    """Perplexity of the assistant turns of conversations, the prompts masked out."""
    if not conversations:
        raise LargeForgeError("no conversation to score")
    max_length = max_length or default_max_length(model)
    samples, truncated, skipped = instruction_samples(tokenizer, conversations, template,
                                                      max_length)
    if not samples:
        raise LargeForgeError(
            "no conversation has an assistant token to score (each needs an assistant turn "
            "within the model's context)"
        )
    total, count = score_samples(model, samples, batch_size=batch_size)
    return _result(total, count, len(conversations), truncated=truncated, skipped=skipped)
