"""LargeForge: train, fine-tune, evaluate, export and serve language models on your own hardware.

The library API (the CLI is a thin layer over it: each command calls one of these):

    from largeforge import ModelConfig, load_recipe, train, Trainer, generate, train_tokenizer
    from largeforge import SFTTrainer, DPOTrainer, ORPOTrainer, SimPOTrainer, merge_adapter
    from largeforge import import_model
    from largeforge import evaluate, compare, export_model, quantize, serve, serve_router
    from largeforge import DatasetValidator, prepare_dataset, split_dataset, SyntheticDataGenerator

Names are imported lazily so that `import largeforge` and `largeforge --help` stay fast (no
torch).
"""

from __future__ import annotations

import importlib
from typing import Any

from largeforge.version import __version__ as __version__

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
    "TrainResult": "largeforge.training.state",
    "train_tokenizer": "largeforge.tokenizer",
    "load_tokenizer": "largeforge.tokenizer",
    "prepare_pretraining_data": "largeforge.data.pretrain",
    "generate": "largeforge.inference.generate",
    "SamplingParams": "largeforge.inference.sampling",
    "hardware_report": "largeforge.hardware",
    # training from Python: a recipe file's run; preference optimisation (`train dpo|orpo`)
    "Trainer": "largeforge.trainer",
    "DPOTrainer": "largeforge.training.preference_api",
    "ORPOTrainer": "largeforge.training.preference_api",
    "SimPOTrainer": "largeforge.training.preference_api",
    # `largeforge eval` and `largeforge compare`
    "evaluate": "largeforge.evaluation.evaluate",
    "Evaluation": "largeforge.evaluation.evaluate",
    "evaluate_model": "largeforge.evaluation.evaluate",
    "EvalResult": "largeforge.evaluation.evaluate",
    "compare": "largeforge.evaluation.compare",
    "compare_models": "largeforge.evaluation.compare",
    "CompareOutcome": "largeforge.evaluation.compare",
    # `largeforge export` and `largeforge quantize`
    "export_model": "largeforge.export.dispatch",
    "plan_export": "largeforge.export.dispatch",
    "ExportPlan": "largeforge.export.dispatch",
    "export_hf": "largeforge.export.hf",
    "export_gguf": "largeforge.export.gguf",
    "export_ollama": "largeforge.export.ollama",
    "export_onnx": "largeforge.export.onnx_export",
    "export_torchscript": "largeforge.export.torchscript",
    "quantize": "largeforge.export.quantize",
    # `largeforge data validate|prepare|split|stats|synth`
    "DatasetValidator": "largeforge.data.validate",
    "ValidationReport": "largeforge.data.validate",
    "validate_records": "largeforge.data.validate",
    "prepare_dataset": "largeforge.data.prepared",
    "split_dataset": "largeforge.data.prepared",
    "PreparedData": "largeforge.data.prepared",
    "compute_stats": "largeforge.data.stats",
    "SyntheticDataGenerator": "largeforge.data.synth",
    "synthesize": "largeforge.data.synth",
    # `largeforge serve inference` and `largeforge serve router`
    "serve": "largeforge.server",
    "build_server_app": "largeforge.server",
    "serve_router": "largeforge.serving.router_app",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'largeforge' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
