"""Merging a LoRA adapter (PEFT's format) into its base model: a plain Hugging Face directory that
loads without `peft`, with the same logits as base + adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from largeforge.errors import LargeForgeError

ADAPTER_CONFIG = "adapter_config.json"


def adapter_base(adapter_dir: str | Path) -> str | None:
    """The base model an adapter names in its adapter_config.json, if any."""
    config = Path(adapter_dir) / ADAPTER_CONFIG
    if not config.is_file():
        raise LargeForgeError(
            f"{adapter_dir} is not a PEFT adapter directory: it has no {ADAPTER_CONFIG}"
        )
    return json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")


def merge_adapter(
    adapter_dir: str | Path,
    output: str | Path,
    *,
    base: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Load `base` (default: the base the adapter names), apply the adapter, fold its weights into
    the base weights, and save the result with the base's tokenizer (when it has one)."""
    from peft import PeftModel

    from largeforge.models import load_model
    from largeforge.tokenizer import load_tokenizer
    from largeforge.training.checkpoint import save_model_dir

    base_ref = base or adapter_base(adapter_dir)
    if base is not None:
        adapter_base(adapter_dir)  # still check that it is an adapter directory
    if not base_ref:
        raise LargeForgeError(
            f"the adapter in {adapter_dir} does not name its base model; pass --base"
        )
    target = Path(output)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise LargeForgeError(f"output {target} is not empty; choose another or pass --overwrite")
    model = load_model(base_ref)
    try:
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except (ValueError, KeyError, RuntimeError) as exc:
        raise LargeForgeError(
            f"the adapter in {adapter_dir} does not fit the base model {base_ref}: {exc}"
        ) from None
    tokenizer: Any = None
    for source in (adapter_dir, base_ref):
        try:
            tokenizer = load_tokenizer(source)
            break
        except LargeForgeError:
            continue
    save_model_dir(merged, tokenizer, target)
    return target
