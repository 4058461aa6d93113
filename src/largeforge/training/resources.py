"""What a run needs in memory, bounded from below before anything is allocated.

A model of `model.dim` 10,000,000 or a `train.batch_size` of 10^12 used to hang the process or
get it killed while it built the model or the first batch. These are lower bounds only (the
weights, their gradients and AdamW's two moments; one hidden state per layer kept for the
backward pass), so a run refused here could never have fitted, and nothing that fits is refused.
"""

from __future__ import annotations

import os

import torch

from largeforge.errors import LargeForgeError
from largeforge.hardware import device_memory_bytes
from largeforge.models import ModelConfig

BYTES_PER_TRAINED_PARAMETER = 16  # fp32 weight + fp32 gradient + AdamW's two fp32 moments
BYTES_PER_ACTIVATION = 2  # one bf16 value: the smallest a hidden state is kept in


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_new_model_fits(shape: ModelConfig, device: torch.device) -> None:
    """A model about to be built and trained in full: its weights, gradients and optimizer
    state must fit the device."""
    total = device_memory_bytes(device)
    parameters = shape.parameter_count
    need = parameters * BYTES_PER_TRAINED_PARAMETER
    if total is not None and need > total:
        raise LargeForgeError(
            f"the model (dim {shape.dim}, {shape.n_layers} layers, vocab {shape.vocab_size}) "
            f"has {parameters:,} parameters: training it needs at least {gib(need)} for "
            f"weights, gradients and optimizer state, more than the {gib(total)} "
            f"of {device.type}; choose a smaller model.preset or lower model.dim / n_layers"
        )


def check_batch_fits(batch_size: int, seq_len: int, hidden: int, layers: int,
                     device: torch.device) -> None:
    """One micro-batch of `batch_size` x `seq_len` tokens keeps at least one hidden state per
    layer for the backward pass: it must fit the device."""
    total = device_memory_bytes(device)
    need = batch_size * seq_len * hidden * layers * BYTES_PER_ACTIVATION
    if total is not None and need > total:
        raise LargeForgeError(
            f"train.batch_size {batch_size} x data.seq_len {seq_len} needs at least {gib(need)} "
            f"of activations ({layers} layers of width {hidden}), more than the {gib(total)} of "
            f"{device.type}; lower train.batch_size (train.grad_accum makes the effective batch "
            "larger without the memory)"
        )


def check_threads(threads: int | None) -> None:
    """More compute threads than cores only makes OpenMP's threads wait for each other (and
    100,000 of them exhaust the process)."""
    cores = os.cpu_count()
    if threads is not None and cores is not None and threads > cores:
        raise LargeForgeError(
            f"train.threads {threads} is more than the {cores} CPU cores of this machine; "
            f"leave it unset or set at most {cores}"
        )
