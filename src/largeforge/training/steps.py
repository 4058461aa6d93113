"""The arithmetic of steps, shared by the trainer's phases: batches to the device, evaluation sums,
the all-reduce of a step, the step count of an epoch budget, throughput, and the facts a run
reports about its model and hardware."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from largeforge.errors import LargeForgeError
from largeforge.hardware import (
    autocast_dtype,
    device_name,
    installed_version,
    matmul_flops,
    memory_bytes,
    peak_fp32_flops,
)
from largeforge.training.cross_entropy import IGNORE_INDEX
from largeforge.training.distributed import Distributed
from largeforge.training.objectives import Batch, Objective, causal_lm_loss


def to_device(batch: Any, device: torch.device) -> Batch:
    """Pretraining batches are (x, y) pairs; instruction batches are dicts."""
    if isinstance(batch, tuple):
        batch = {"input_ids": batch[0], "labels": batch[1]}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: list[Any],
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    objective: Objective = causal_lm_loss,
) -> float:
    """Mean loss over fixed evaluation batches, weighted by each batch's target tokens."""
    total, count = eval_sums(model, batches, device, autocast, objective)
    return total / max(count, 1)


@torch.no_grad()
def eval_sums(
    model: torch.nn.Module,
    batches: list[Any],
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    objective: Objective = causal_lm_loss,
    counted: int | None = None,
) -> tuple[float, int]:
    """(sum of loss x targets, targets) over the first `counted` batches (default all); the
    others only run (an FSDP rank keeps step with the rest)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for index, raw in enumerate(batches):
        batch = to_device(raw, device)
        targets = int((batch["labels"] != IGNORE_INDEX).sum())
        with autocast or contextlib.nullcontext():
            loss, _ = objective(model, batch)
        if counted is None or index < counted:
            total += loss.item() * targets
            count += targets
    model.train(was_training)
    return total, count


def reduce_step(
    d: Distributed, loss_sum: torch.Tensor, metrics: dict[str, Any], tokens: int
) -> tuple[torch.Tensor, dict[str, Any], int]:
    """One all-reduce for the step: the loss and metrics averaged over ranks (so the logged
    loss is the global batch's), the tokens summed."""
    keys = list(metrics)
    packed = torch.stack([
        loss_sum.detach().double(), torch.tensor(float(tokens), device=loss_sum.device).double(),
        *[torch.as_tensor(metrics[k], device=loss_sum.device).detach().double() for k in keys],
    ])
    d.all_reduce_sum(packed)
    loss = (packed[0] / d.world_size).to(loss_sum.dtype)
    reduced = {k: (packed[2 + i] / d.world_size).float() for i, k in enumerate(keys)}
    return loss, reduced, int(packed[1].item())


def max_steps_for(
    cfg_t: Any, batches_per_epoch: int, say: Callable[..., None], world_size: int = 1
) -> int:
    """train.max_steps, or the steps of train.num_epochs passes over the data when set (a step
    takes grad_accum batches on each of `world_size` processes)."""
    if cfg_t.num_epochs is None:
        return int(cfg_t.max_steps)
    per_epoch = max(1, math.ceil(batches_per_epoch / (cfg_t.grad_accum * world_size)))
    steps = max(1, math.ceil(cfg_t.num_epochs * per_epoch))
    say(f"{cfg_t.num_epochs:g} epoch(s) of {per_epoch} steps: {steps} steps")
    return steps


@dataclass
class Throughput:
    """Tokens per second and model FLOPs utilisation over logging windows; a window restarts
    after evaluations and checkpoints, whose time is not training time."""

    flops_per_token: float
    peak_flops: float
    world_size: int = 1
    start: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    speeds: list[float] = field(default_factory=list)
    mfus: list[float] = field(default_factory=list)

    def measure(self) -> tuple[float, float]:
        """(tokens/s, MFU) of the window so far, kept for the run's medians."""
        speed = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        mfu = self.flops_per_token * speed / (self.peak_flops * self.world_size)
        self.speeds.append(speed)
        self.mfus.append(mfu)
        return speed, mfu

    def restart(self) -> None:
        self.start, self.tokens = time.perf_counter(), 0


def median_of_windows(values: list[float]) -> float | None:
    # The first logging window includes warm-up; leave it out when there are others.
    usable = values[1:] if len(values) > 2 else values
    if not usable:
        return None
    ordered = sorted(usable)
    return ordered[len(ordered) // 2]


def ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_flops(device: torch.device, precision: str) -> float:
    dtype = autocast_dtype(precision)
    if dtype is None:
        return peak_fp32_flops(device)
    n = 4096 if device.type == "cuda" else 1024
    return matmul_flops(device, dtype, n=n)


def hardware_summary(
    device: torch.device, precision: str, peak: float, d: Distributed | None = None
) -> dict[str, Any]:
    """What the run ran on (one process's share, and how many there were), for run.json and the
    run's report."""
    import os
    import platform

    memory = memory_bytes()
    processes = {"distributed": d.mode, "processes": d.world_size} if d and d.enabled else {}
    return {
        **processes,
        "device": device.type, "device_name": device_name(device), "precision": precision,
        "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_gib": round(memory / 2**30, 1) if memory else None,
        "peak_gflops": round(peak / 1e9, 1), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": installed_version("transformers"),
        "peft": installed_version("peft"),
    }


def check_seq_len(seq_len: int, max_len: int) -> None:
    if seq_len > max_len:
        raise LargeForgeError(
            f"data.seq_len {seq_len} is above the model's maximum sequence length "
            f"{max_len}; lower data.seq_len or raise model.max_seq_len"
        )


def check_model_fits(model: torch.nn.Module, tokenizer: Any, seq_len: int) -> None:
    cfg = model.config
    check_seq_len(seq_len, cfg.max_position_embeddings)
    if cfg.vocab_size < len(tokenizer):
        raise LargeForgeError(
            f"the model's vocabulary ({cfg.vocab_size}) is smaller than the tokenizer's "
            f"({len(tokenizer)})"
        )


def set_generation_ids(model: Any, tokenizer: Any) -> None:
    """So `generate` in transformers (and ours) stops at our EOS."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(model.config, name, value)
            setattr(model.generation_config, name, value)


def model_shape(model: Any) -> str:
    c = model.config
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    ffn = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or "4x"
    return (
        f"{c.model_type}: dim {c.hidden_size}, {c.num_hidden_layers} layers, "
        f"{c.num_attention_heads} heads ({kv} kv), ffn {ffn}, vocab {c.vocab_size}, "
        f"max seq {c.max_position_embeddings}"
    )
