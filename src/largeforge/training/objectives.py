"""Training objectives: plain functions `(model, batch) -> (loss, metrics)`.

The loop knows nothing about what is optimised; pretraining is next-token cross-entropy.
Later objectives (SFT with masks, DPO, ORPO, distillation) have the same shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from largeforge.training.cross_entropy import IGNORE_INDEX, cross_entropy


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # Packed batches carry position_ids (restarting per sample) or a block-diagonal mask;
    # transformers honours the restarts only without a KV cache, hence use_cache=False.
    extra = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    return model(input_ids=batch["input_ids"], use_cache=False, **extra).logits


def _mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # .reshape, not .view: transformers may return non-contiguous logits.
    flat, targets = logits.reshape(-1, logits.size(-1)), labels.reshape(-1)
    if torch.compiler.is_compiling():  # inductor fuses the library's version itself
        return F.cross_entropy(flat.float(), targets, ignore_index=IGNORE_INDEX)
    return cross_entropy(flat, targets)


def causal_lm_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean cross-entropy of `labels` given `input_ids`, where labels are already shifted
    (pretraining windows: labels[t] is the token after input_ids[t]); IGNORE_INDEX is skipped."""
    return _mean_cross_entropy(_logits(model, batch), batch["labels"]), {}


def instruction_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token cross-entropy where `labels` are aligned with `input_ids` (Hugging Face's
    convention, as `data.instruct_batches` yields them) and shifted here; IGNORE_INDEX marks
    prompt, padding and the first token of each packed sample."""
    logits = _logits(model, batch)
    return _mean_cross_entropy(logits[:, :-1], batch["labels"][:, 1:]), {}
