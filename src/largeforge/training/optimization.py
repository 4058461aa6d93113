"""How the loop optimises: AdamW (fused where it can be) and torch.compile of the training step."""

from __future__ import annotations

from typing import Any

import torch

from largeforge.config import Recipe
from largeforge.training.objectives import fused_head


def make_optimizer(model: torch.nn.Module, recipe: Recipe, device: torch.device) -> Any:
    """AdamW; weight decay on matrices only (not norms or biases), as in nanoGPT."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    t = recipe.train
    groups = [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8,
        fused=fused_adamw_applies(decay + no_decay, device) or None,
    )


def compile_for_training(runner: torch.nn.Module) -> torch.nn.Module:
    """torch.compile for the training step. Where the objective fuses the output layer with the
    loss (`objectives.fused_head`), only the decoder is compiled, in place (state-dict keys
    unchanged), and the fused head stays: measured on the `small` preset in fp32 on 2 CPU
    cores, 1,552 tokens/s against 1,428 eager, where compiling the whole model (inductor then
    computes the full logits and the library's loss) was slower than the fused eager step."""
    fused = fused_head(runner)
    if fused is None:
        return torch.compile(runner)  # type: ignore[return-value]
    fused[0].compile()
    return runner


def fused_adamw_applies(params: list[torch.nn.Parameter], device: torch.device) -> bool:
    """Whether AdamW's fused kernel (one pass over each parameter instead of foreach's several)
    can take these parameters: measured on the `small` preset on 2 CPU cores, the optimizer
    step goes from 45 to 14 ms. Sharded (FSDP DTensor) parameters keep the default."""
    from torch.distributed.tensor import DTensor

    return device.type in ("cpu", "cuda") and all(
        p.is_floating_point() and p.device.type == device.type and not isinstance(p, DTensor)
        for p in params
    )
