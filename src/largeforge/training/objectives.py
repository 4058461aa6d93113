"""Training objectives: plain functions `(model, batch) -> (loss, metrics)`.

The loop knows nothing about what is optimised; pretraining is next-token cross-entropy.
Later objectives (SFT with masks, DPO, ORPO, distillation) have the same shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from largeforge.training.cross_entropy import IGNORE_INDEX, cross_entropy
from largeforge.training.linear_cross_entropy import linear_cross_entropy

Batch = dict[str, torch.Tensor]
# (model, batch) -> (loss, metrics); metrics are detached tensors, read only when logged.
Objective = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]

# Causal LMs whose logits are exactly `lm_head(model.model(...).last_hidden_state)`: no logit
# scaling or soft-capping, so the head and the loss can be fused (linear_cross_entropy).
FUSED_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Packed batches carry position_ids (restarting per sample) or a block-diagonal mask;
    # transformers honours the restarts only without a KV cache, hence use_cache=False.
    extra = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    return {"input_ids": batch["input_ids"], "use_cache": False, **extra}


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**_model_inputs(batch)).logits


def fused_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.Tensor] | None:
    """(the decoder that gives the last hidden states, the output projection's weight) when the
    loss may be computed from those directly; None where the model's own forward must run:
    wrapped models (DDP, FSDP: their hooks live in that forward), compiled steps (inductor
    fuses the plain loss itself), architectures with extra logit processing, a quantised or
    adapted output layer, or adapters other than LoRA."""
    from transformers import PreTrainedModel

    if torch.compiler.is_compiling():
        return None
    base = model
    peft_config = getattr(model, "peft_config", None)
    if peft_config is not None:  # PEFT: LoRA layers sit inside the base model's modules
        from peft import PeftType

        if any(c.peft_type != PeftType.LORA for c in peft_config.values()):
            return None
        base = model.get_base_model()  # type: ignore[operator]
    if not isinstance(base, PreTrainedModel):
        return None
    from torch.distributed.fsdp import FSDPModule

    if isinstance(base, FSDPModule):
        return None
    if getattr(base.config, "model_type", None) not in FUSED_HEAD_MODEL_TYPES:
        return None
    head, decoder = base.get_output_embeddings(), getattr(base, "model", None)
    if type(head) is not torch.nn.Linear or head.bias is not None or decoder is None:
        return None
    return decoder, head.weight


def _token_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], shift: bool
) -> torch.Tensor:
    """Mean cross-entropy of the batch's labels; `shift`: labels are aligned with input_ids
    (predict labels[t + 1] from position t)."""
    labels = batch["labels"]
    fused = fused_head(model)
    if fused is None:
        logits = _logits(model, batch)
        if shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        return _mean_cross_entropy(logits, labels)
    decoder, weight = fused
    hidden = decoder(**_model_inputs(batch)).last_hidden_state
    if shift:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    return linear_cross_entropy(
        hidden.reshape(-1, hidden.size(-1)), weight, labels.reshape(-1)
    )


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
    return _token_loss(model, batch, shift=False), {}


def instruction_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token cross-entropy where `labels` are aligned with `input_ids` (Hugging Face's
    convention, as `data.instruct_batches` yields them) and shifted here; IGNORE_INDEX marks
    prompt, padding and the first token of each packed sample."""
    return _token_loss(model, batch, shift=True), {}
