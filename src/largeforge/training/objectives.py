"""Training objectives: plain functions `(model, batch) -> (loss, metrics)`.

The loop knows nothing about what is optimised; pretraining is next-token cross-entropy.
Later objectives (SFT with masks, DPO, ORPO, distillation) have the same shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from largeforge.training.cross_entropy import IGNORE_INDEX, cross_entropy


def causal_lm_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy of `labels` (already shifted; IGNORE_INDEX masked) given `input_ids`."""
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    labels = batch["labels"].reshape(-1)
    # .reshape, not .view: transformers may return non-contiguous logits.
    flat = logits.reshape(-1, logits.size(-1))
    if torch.compiler.is_compiling():  # inductor fuses the library's version itself
        return F.cross_entropy(flat.float(), labels, ignore_index=IGNORE_INDEX), {}
    return cross_entropy(flat, labels), {}
