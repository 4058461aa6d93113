"""LargeForge: train, fine-tune, evaluate, export and serve language models on your own hardware.

The library API (the CLI is a thin layer over it):

    from largeforge import ModelConfig, load_recipe, train, generate, train_tokenizer
    from largeforge import SFTTrainer, merge_adapter, import_model

Names are imported lazily so that `import largeforge` and `largeforge --help` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LargeForgeError": "largeforge.errors",
    "ModelConfig": "largeforge.models",
    "PRESETS": "largeforge.models",
    "build_model": "largeforge.models",
    "load_model": "largeforge.models",
    "Recipe": "largeforge.config",
    "load_recipe": "largeforge.config",
    "train": "largeforge.training.loop",
    "SFTTrainer": "largeforge.training.sft",
    "merge_adapter": "largeforge.merge",
    "import_model": "largeforge.sources.importer",
    "TrainResult": "largeforge.training.loop",
    "train_tokenizer": "largeforge.tokenizer",
    "load_tokenizer": "largeforge.tokenizer",
    "prepare_pretraining_data": "largeforge.data.pretrain",
    "generate": "largeforge.inference.generate",
    "SamplingParams": "largeforge.inference.sampling",
    "hardware_report": "largeforge.hardware",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'largeforge' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
