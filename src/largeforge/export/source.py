"""What every export starts from: the model a reference names, as one plain model, and the
output directory, written atomically.

`load_source` accepts a model directory, a run directory, a PEFT (LoRA) adapter directory or a
LoRA run (whose final/ is an adapter) and a hub id; an adapter is merged into its base first
(`largeforge.models.load_adapted_model`, peft's `merge_and_unload`), so every format gets one
model with the same logits as base + adapter. Outputs are written through `largeforge.staging`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from largeforge.damaged_files import DamagedFileError
from largeforge.errors import LargeForgeError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
EXPORT_INFO = "export_info.json"


@dataclass
class ExportSource:
    """A model ready to export: merged, in eval mode, on the CPU."""

    model: Any  # a transformers PreTrainedModel
    tokenizer: Any | None  # None when neither the model nor its base has one
    reference: str  # the resolved model directory (or hub id)
    merged_adapter: bool  # True when `reference` was a LoRA adapter, now merged in


def _refuse_quantized(resolved: str) -> None:
    config = Path(resolved) / "config.json"
    if not config.is_file():
        return
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # loading the model will say what is wrong with it
    quant = settings.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "a quantisation method")
        raise LargeForgeError(
            f"{resolved} holds a quantised model ({method}); export from the unquantised "
            "model it was made from"
        )


def find_tokenizer(*candidates: str | None) -> Any | None:
    """The first tokenizer found among model directories (or hub ids); None if none has one."""
    from largeforge.tokenizer import load_tokenizer

    for candidate in candidates:
        if not candidate:
            continue
        path = Path(candidate)
        if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
            continue
        try:
            return load_tokenizer(candidate)
        except DamagedFileError:
            raise  # a tokenizer is there, but broken: not one to pass over
        except LargeForgeError:
            continue
    return None


def load_source(model_ref: str | Path, *, dtype: torch.dtype = torch.float32) -> ExportSource:
    """Load the model `model_ref` names (merging a LoRA adapter into its base) and its
    tokenizer (the adapter's own, else its base's)."""
    from largeforge.adapters import adapter_base, is_adapter_dir
    from largeforge.models import load_model
    from largeforge.runs import resolve_model_dir

    resolved = resolve_model_dir(model_ref)
    _refuse_quantized(resolved)
    adapter = is_adapter_dir(resolved)
    base = adapter_base(resolved) if adapter else None
    if base:
        _refuse_quantized(resolve_model_dir(base))
    model = load_model(resolved, dtype=dtype)
    if getattr(model, "is_quantized", False):
        raise LargeForgeError(
            f"{resolved} loads as a quantised model; export from the unquantised model"
        )
    model.eval()
    tokenizer = find_tokenizer(resolved, base)
    return ExportSource(model=model, tokenizer=tokenizer, reference=resolved,
                        merged_adapter=adapter)


def write_export_info(directory: Path, info: dict[str, Any]) -> None:
    from largeforge.atomic_files import write_atomic_text

    write_atomic_text(directory / EXPORT_INFO, json.dumps(info, indent=2) + "\n")


def check_choice(value: str, valid: tuple[str, ...] | list[str], what: str) -> str:
    """`value` if it is one of `valid`, else an error that lists them."""
    if value not in valid:
        raise LargeForgeError(f"unknown {what} {value!r}; expected one of: {', '.join(valid)}")
    return value
