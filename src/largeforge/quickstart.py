"""The quickstart: train a tiny model on text every Python installation has, then sample.

The corpus is the interpreter's own documentation (`pydoc_data.topics`) and the docstrings of
the standard library (see `quickstart_corpus.py`): no download, and no one else's prose copied
into this repository. `recipes/quickstart.yaml` holds the same recipe (a test keeps them equal).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from largeforge.config import ResolvedRecipe, load_recipe
from largeforge.training.loop import train
from largeforge.training.state import TrainResult

QUICKSTART_RECIPE: dict[str, Any] = {
    "model": {"preset": "tiny"},
    "tokenizer": {"vocab_size": 4096},
    "data": {"train": ["builtin:python-docs"], "seq_len": 128, "val_percent": 5.0},
    "train": {
        "batch_size": 16,
        "max_steps": 1000,
        "lr": 2e-3,
        "warmup_steps": 50,
        "eval_every": 250,
        "eval_batches": 20,
        "log_every": 25,
    },
    "output": {"name": "quickstart"},
}

SAMPLE_PROMPTS = ["Return the", "The built-in function"]


def quickstart_recipe(
    overrides: list[str] | None = None, output_dir: str | None = None
) -> ResolvedRecipe:
    """The quickstart recipe with optional `section.key=value` overrides."""
    flags = {"output.dir": output_dir} if output_dir else {}
    return load_recipe(
        QUICKSTART_RECIPE, config_name="quickstart recipe", flags=flags, overrides=overrides or []
    )


def run_quickstart(
    overrides: list[str] | None = None,
    *,
    output_dir: str | None = None,
    overwrite: bool = True,
    console: Console | None = None,
) -> tuple[TrainResult, list[str]]:
    """Train the quickstart model and return the result with one sample per prompt."""
    from largeforge.inference.generate import load_for_inference, stream_text
    from largeforge.inference.sampling import SamplingParams

    console = console or Console()
    resolved = quickstart_recipe(overrides, output_dir)
    result = train(resolved, overwrite=overwrite, console=console)
    model, tokenizer = load_for_inference(str(result.final_dir))
    samples = []
    for prompt in SAMPLE_PROMPTS:
        params = SamplingParams(max_new_tokens=60, temperature=0.8, top_k=40, seed=0)
        samples.append(prompt + "".join(stream_text(model, tokenizer, prompt, params)))
    return result, samples
