"""Generation for many prompts at once (`largeforge eval` uses it): left-padded batches over one
KV cache.

Prompts of different lengths are padded on the left, so every row's newest token sits in the
last column and one forward pass per step serves the whole batch. The attention mask hides the
padding, and each row's position ids count its own tokens only (padding takes no position), so
a row sees exactly what it would see alone: greedy decoding gives the same text as
`largeforge.inference.generate.generate()` for each prompt on its own (a test checks this).
Each row stops at EOS (not included), at a stop string (cut out of the text), at
`max_new_tokens` or at the model's context length, like `generate_ids`; the batch stops when
every row has. Prompts are sorted by length before batching, so rows of a batch need little
padding; the results come back in the order of the prompts.

Hand-written rather than `model.generate`, because our sampling (`inference.sampling`), EOS
handling and context budget must match the single-prompt loop token for token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from largeforge.errors import LargeForgeError
from largeforge.inference.generate import (
    cache_keyword,
    context_length,
    encode_prompt,
    forward_params,
    model_eos_ids,
    new_cache,
)
from largeforge.inference.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    sample_next_token,
)

StopCheck = Callable[[list[int]], bool]


def _next_tokens(
    logits: torch.Tensor,
    previous: list[list[int]],
    params: SamplingParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One token per row. The repetition penalty is applied row by row over that row's own
    prompt and output (padding must not count as seen tokens); the rest is `sample_next_token`."""
    if params.repetition_penalty != 1.0:
        rows = [
            apply_repetition_penalty(
                logits[i : i + 1].float(),
                torch.tensor([seen], dtype=torch.long, device=logits.device),
                params.repetition_penalty,
            )
            for i, seen in enumerate(previous)
        ]
        logits = torch.cat(rows)
        params = dataclasses.replace(params, repetition_penalty=1.0)
    empty = torch.empty(logits.size(0), 0, dtype=torch.long, device=logits.device)
    return sample_next_token(logits, empty, params, generator)


def generate_batch_ids(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    eos_token_ids: set[int] | None = None,
    pad_token_id: int = 0,
    stop: StopCheck | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (ids), all prompts in one left-padded batch.

    `eos_token_ids=None` takes them from the model's configs; `stop(ids)` is asked after each
    new token of a row and ends that row when true (the token is kept; cut its text later).
    A seeded `generator` makes sampling reproducible; greedy decoding ignores it.
    """
    if not prompts:
        return []
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise LargeForgeError("every prompt needs at least one token")
    limit = context_length(model)
    if limit is not None and max(lengths) > limit:
        raise LargeForgeError(
            f"a prompt is {max(lengths)} tokens but the model's context is {limit} tokens; "
            "shorten it"
        )
    budgets = [
        params.max_new_tokens if limit is None else min(params.max_new_tokens, limit - n)
        for n in lengths
    ]
    steps = max(budgets)
    outputs: list[list[int]] = [[] for _ in prompts]
    if steps <= 0:
        return outputs
    eos = model_eos_ids(model) if eos_token_ids is None else set(eos_token_ids)

    device = next(model.parameters()).device
    rows, width = len(prompts), max(lengths)
    ids = torch.full((rows, width + steps), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(rows, width + steps, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) : width] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) : width] = 1
    # Padding takes no position: each row counts from 0 at its first real token.
    positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
    next_position = torch.tensor(lengths, dtype=torch.long, device=device).unsqueeze(1)
    top_position = (limit - 1) if limit is not None else None

    accepted = forward_params(type(model))
    extra: dict[str, Any] = {}
    if "logits_to_keep" in accepted:
        extra["logits_to_keep"] = 1
    wants_cache_position = "cache_position" in accepted  # transformers 4.x
    done = [budget <= 0 for budget in budgets]
    previous = [list(map(int, p)) for p in prompts]
    cache = new_cache(model)
    was_training = model.training
    model.eval()
    try:
        step_input = ids[:, :width]
        length = width
        for _ in range(steps):
            with torch.inference_mode():
                if wants_cache_position:
                    extra["cache_position"] = torch.arange(
                        length - step_input.size(1), length, device=device
                    )
                out = model(
                    input_ids=step_input,
                    attention_mask=mask[:, :length],
                    position_ids=positions,
                    use_cache=True,
                    **{cache_keyword(type(model)): cache},
                    **extra,
                )
                tokens = _next_tokens(out.logits[:, -1, :], previous, params, generator)
            for row, token in enumerate(tokens.tolist()):
                if done[row]:
                    continue
                if params.stop_at_eos and token in eos:
                    done[row] = True
                    continue
                outputs[row].append(token)
                previous[row].append(token)
                if len(outputs[row]) >= budgets[row] or (stop is not None and stop(outputs[row])):
                    done[row] = True
            if all(done):
                break
            ids[:, length] = tokens
            mask[:, length] = 1
            # Finished rows keep running until the batch ends; their positions are held inside
            # the context so models with learned position tables never index past it.
            positions = next_position if top_position is None else next_position.clamp(
                max=top_position
            )
            next_position = next_position + 1
            length += 1
            step_input = ids[:, length - 1 : length]
    finally:
        model.train(was_training)
    return outputs


def cut_at_first(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(hits)] if hits else text


def generate_batch(
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int]],
    params: SamplingParams | None = None,
    *,
    batch_size: int = 8,
    add_bos: bool | None = None,
    eos_token_ids: set[int] | None = None,
    stop_strings: Sequence[str] = (),
) -> list[str]:
    """The generated text (without the prompt) for each prompt, in the prompts' order.

    A prompt is text (encoded as `generate()` encodes it: `encode_prompt` with `add_bos`) or
    token ids. `eos_token_ids=None` takes the model's and the tokenizer's EOS; text from a
    stop string on is cut off. Sampling with `params.seed` is reproducible for the same
    prompts and batch size.
    """
    params = params or SamplingParams()
    if batch_size < 1:
        raise LargeForgeError(f"batch_size must be >= 1, got {batch_size}")
    encoded = [
        encode_prompt(tokenizer, p, add_bos)[0].tolist() if isinstance(p, str) else list(p)
        for p in prompts
    ]
    eos = model_eos_ids(model, tokenizer) if eos_token_ids is None else set(eos_token_ids)
    stops = [s for s in stop_strings if s]
    stop: StopCheck | None = None
    if stops:
        def stop(ids: list[int]) -> bool:
            text = tokenizer.decode(ids)
            return any(s in text for s in stops)

    pad = next(
        (t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0
    )
    generator = None
    if params.seed is not None and not params.greedy:
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(params.seed)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    texts: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        new_ids = generate_batch_ids(
            model, [encoded[i] for i in chunk], params, eos_token_ids=eos,
            pad_token_id=int(pad), stop=stop, generator=generator,
        )
        for index, ids in zip(chunk, new_ids, strict=True):
            texts[index] = cut_at_first(tokenizer.decode(ids), stops) if ids else ""
    return texts
