"""Merging a LoRA adapter (PEFT's format) into its base model: a plain Hugging Face directory that
loads without `peft`, with the same logits as base + adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from largeforge.adapters import adapter_base
from largeforge.damaged_files import DamagedFileError
from largeforge.errors import LargeForgeError
from largeforge.models import load_adapted_model


def merge_adapter(
    adapter_dir: str | Path,
    output: str | Path,
    *,
    base: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Load `base` (default: the base the adapter names), apply the adapter, fold its weights into
    the base weights, and save the result with the base's tokenizer (when it has one)."""
    from largeforge.runs import resolve_model_dir
    from largeforge.staging import check_output
    from largeforge.tokenizer import load_tokenizer
    from largeforge.training.checkpoint import save_model_dir

    adapter_dir = resolve_model_dir(adapter_dir)  # a LoRA run directory names its final/
    base_ref = base or adapter_base(adapter_dir)
    if base is not None:
        adapter_base(adapter_dir)  # still check that it is an adapter directory
    if not base_ref:
        raise LargeForgeError(
            f"the adapter in {adapter_dir} does not name its base model; pass --base"
        )
    target = Path(output)
    check_output(target, overwrite=overwrite)  # before the slow load
    merged = load_adapted_model(adapter_dir, base=base_ref)
    tokenizer: Any = None
    for source in (adapter_dir, base_ref):
        try:
            tokenizer = load_tokenizer(source)
            break
        except DamagedFileError:
            raise  # a tokenizer is there, but broken: not one to pass over
        except LargeForgeError:
            continue
    save_model_dir(merged, tokenizer, target)
    return target
