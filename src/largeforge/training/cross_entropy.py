"""Token cross-entropy computed a block of rows at a time.

`F.cross_entropy` on [tokens, vocab] logits writes a full log-softmax tensor in the forward pass,
a full zero-filled gradient for the NLL step and another full tensor in the backward pass: at
2,048 tokens x 32,000 vocabulary each is 260 MB streamed through memory, about a sixth of a
training step of the `small` preset on a 2-core CPU. Here the forward pass keeps only one
log-sum-exp per row, and the backward pass writes softmax - one-hot straight into the gradient,
block by block while the block is in cache. Same result to float rounding; no library offers a
CPU version (Liger-Kernel's fused cross-entropy is Triton, GPU only), hence these few lines.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
BLOCK_ELEMENTS = 1 << 20  # logits per block: 4 MB in fp32


def _row_blocks(n_rows: int, n_cols: int) -> range:
    return range(0, n_rows, max(1, BLOCK_ELEMENTS // max(n_cols, 1)))


class _BlockwiseCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n, v = logits.shape
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp(min=1).to(torch.float32)
        safe = labels.masked_fill(~valid, 0)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        rows = _row_blocks(n, v)
        for start in rows:
            block = logits[start:start + rows.step].float()
            top = block.amax(dim=-1, keepdim=True)
            lse[start:start + rows.step] = (
                (block - top).exp_().sum(dim=-1).log_().add_(top.squeeze(-1))
            )
        target = logits.gather(1, safe[:, None]).squeeze(1).float()
        loss = ((lse - target) * valid).sum() / count
        ctx.save_for_backward(logits, safe, valid, lse, count)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        logits, safe, valid, lse, count = ctx.saved_tensors
        n, v = logits.shape
        # d loss / d logits = (softmax - one_hot) * grad_loss / count, zero on ignored rows.
        scale = valid.to(torch.float32) * (grad_loss.to(torch.float32) / count)
        grad = torch.empty_like(logits)
        rows = _row_blocks(n, v)
        for start in rows:
            end = start + rows.step
            if grad.dtype == torch.float32:  # compute in place in the gradient, no temporary
                out = grad[start:end]
                torch.sub(logits[start:end], lse[start:end, None], out=out)
                out.exp_().mul_(scale[start:end, None])
            else:
                block = logits[start:end].float() - lse[start:end, None]
                grad[start:end] = block.exp_().mul_(scale[start:end, None])
        grad[torch.arange(n, device=grad.device), safe] -= scale.to(grad.dtype)
        return grad, None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labels that are not IGNORE_INDEX, like
    `F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)`, for logits [N, V]."""
    if not (logits.requires_grad and torch.is_grad_enabled()):
        # Evaluation: no gradient to write, so the library's kernel is as good.
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
    return _BlockwiseCrossEntropy.apply(logits, labels)
