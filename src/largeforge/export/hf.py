"""Export as a Hugging Face model directory: safetensors (sharded above `max_shard_size`, with
`model.safetensors.index.json`), tokenizer with its chat template, and generation_config.json.

The weights are written by transformers' own `save_pretrained`, so the directory loads with
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from largeforge.errors import LargeForgeError
from largeforge.export.source import check_choice, load_source
from largeforge.staging import check_output, save_tokenizer

HF_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DEFAULT_SHARD_SIZE = "5GB"


def parse_shard_size(size: str | int) -> int:
    """Bytes in a shard size such as "5GB", "500MB", "100KB" or a plain number of bytes."""
    from transformers.utils.hub import convert_file_size_to_int

    text = size.strip() if isinstance(size, str) else size
    try:
        value = int(text) if isinstance(text, str) and text.isdigit() else (
            convert_file_size_to_int(text))
    except (ValueError, TypeError, AttributeError):
        value = None
    if not isinstance(value, int) or value <= 0:
        raise LargeForgeError(
            f"max shard size {size!r} is not a size; write it like 5GB, 500MB, 100KB or a "
            "number of bytes"
        )
    return value


def export_hf(
    model_ref: str | Path,
    output: str | Path,
    *,
    dtype: str = "float32",
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    """Write `model_ref` (a LoRA adapter merged first) as an HF model directory at `output`."""
    from largeforge.runs import resolve_model_dir
    from largeforge.staging import staged_output

    check_choice(dtype, tuple(HF_DTYPES), "hf dtype")
    shard_bytes = parse_shard_size(max_shard_size)
    target = Path(output)
    check_output(target, overwrite=overwrite, source=resolve_model_dir(model_ref))
    source = load_source(model_ref)
    if source.tokenizer is None:
        raise LargeForgeError(
            f"{source.reference} has no tokenizer (tokenizer.json or tokenizer_config.json) "
            "and neither has its base; an HF export needs one, so save it into the model "
            "directory first"
        )
    model = source.model.to(HF_DTYPES[dtype])
    model.config.dtype = dtype  # what from_pretrained(dtype="auto") will pick
    with staged_output(target, overwrite=overwrite) as staging:
        _save(model, staging, shard_bytes)
        save_tokenizer(source.tokenizer, staging)
        if not (staging / "generation_config.json").is_file():
            from transformers import GenerationConfig

            GenerationConfig.from_model_config(model.config).save_pretrained(str(staging))
    return target


def _save(model: torch.nn.Module, directory: Path, shard_bytes: int) -> None:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the CLI prints its own line
    try:
        model.save_pretrained(  # type: ignore[operator]
            str(directory), max_shard_size=shard_bytes, safe_serialization=True
        )
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
