"""The output projection and the token cross-entropy in one pass, a block of tokens at a time.

A language model's last step, logits = hidden @ W.T and then cross-entropy, writes a full
[tokens, vocab] fp32 logits tensor, reads it back for the log-sum-exp, and in the backward pass
writes a gradient of the same size and reads it twice more for the two matmuls. For the `small`
preset (2,048 tokens x 32,000 vocabulary) each such tensor is 262 MB, streamed through memory
five times per step. Here each block of tokens has its logits computed, turned into the
gradient softmax - one-hot while they are still in cache, and multiplied out at once into the
gradients of the hidden states and of W; the full logits never exist. The gradients are
computed in the forward pass (for a scalar loss, the backward pass only scales them by the
incoming gradient), so a step does the same matmul FLOPs and one exp per logit instead of two.

Libraries that do this (Liger-Kernel, Apple's cut-cross-entropy) are Triton kernels, GPU only;
on a CPU these few lines of torch are what there is. `cross_entropy.py` is the plain version for
models whose logits we cannot take apart (`objectives.fused_head` decides).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from largeforge.training.cross_entropy import IGNORE_INDEX

BLOCK_TOKENS_CPU = 256  # 256 x 32,000 fp32 logits: 33 MB, about what a server CPU's L3 holds
BLOCK_TOKENS_CUDA = 4096  # not measured (no GPU here): a GPU wants larger matmuls, not cache


def _block_tokens(device: torch.device) -> int:
    return BLOCK_TOKENS_CUDA if device.type == "cuda" else BLOCK_TOKENS_CPU


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        n = hidden.size(0)
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp(min=1).to(torch.float32)
        safe = labels.masked_fill(~valid, 0)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        w = weight.to(compute_dtype)
        step = _block_tokens(hidden.device)
        for start in range(0, n, step):
            end = min(start + step, n)
            h = hidden[start:end].to(compute_dtype)
            logits = (h @ w.t()).float()  # [block, vocab], a temporary of this block
            rows = torch.arange(end - start, device=hidden.device)
            target = logits[rows, safe[start:end]]
            top = logits.amax(dim=-1, keepdim=True)
            logits.sub_(top).exp_()
            sums = logits.sum(dim=-1, keepdim=True)
            # loss per row: log-sum-exp of the logits minus the target's logit
            row_loss = sums.squeeze(-1).log() + top.squeeze(-1) - target
            block_valid = valid[start:end]
            loss_sum += (row_loss * block_valid).sum()
            # d loss / d logits = (softmax - one_hot) / count on the rows that count.
            scale = block_valid.to(torch.float32) / count
            grad_logits = logits.mul_(scale[:, None] / sums)  # softmax x scale, one pass
            grad_logits[rows, safe[start:end]] -= scale
            g = grad_logits.to(compute_dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = g @ w
            if grad_weight is not None:
                if grad_weight.dtype == compute_dtype:
                    grad_weight.addmm_(g.t(), h)
                else:  # low-precision blocks, accumulated in the weight's precision
                    grad_weight += g.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.backward_done = False
        return loss_sum / count

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        if ctx.backward_done:
            raise RuntimeError(
                "linear_cross_entropy: a second backward through the same loss (retain_graph) "
                "is not supported; its gradients were computed once, in the forward pass"
            )
        ctx.backward_done = True
        grad_hidden, grad_weight = ctx.saved_tensors
        # Scaled in place: a copy of the output layer's gradient would cost its size again
        # (98 MB for the base preset's 32,000 x 768 head).
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of `labels` [N] over logits `hidden` [N, D] @ `weight` [V, D].T,
    skipping IGNORE_INDEX; equal (to float rounding) to
    `F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=IGNORE_INDEX)`.
    Under autocast the matmuls run in autocast's dtype, the softmax in fp32, as there."""
    device = hidden.device
    compute_dtype = (
        torch.get_autocast_dtype(device.type)
        if torch.is_autocast_enabled(device.type)
        else weight.dtype
    )
    with torch.autocast(device.type, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(hidden, weight, labels, compute_dtype)
        # Evaluation: no gradient, so the blocks only bound the memory of the logits.
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=device)
        step = _block_tokens(device)
        for start in range(0, hidden.size(0), step):
            logits = (hidden[start:start + step].to(compute_dtype) @ w.t()).float()
            total += F.cross_entropy(
                logits, labels[start:start + step], ignore_index=IGNORE_INDEX, reduction="sum"
            )
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1)
