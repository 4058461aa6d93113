"""`largeforge import`: a GGUF file or an Ollama model as a Hugging Face model directory."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console


def import_command(
    source: str = typer.Argument(
        ..., help="A .gguf file, or ollama:NAME[:TAG] from the local Ollama store "
        "($OLLAMA_MODELS, else ~/.ollama/models)."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="The model directory to write."),
    dtype: str = typer.Option(
        "float32", "--dtype", help="Weights' dtype: float32 (exact), float16 or bfloat16."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output."),
) -> None:
    """Write weights (safetensors), tokenizer, chat template and generation config."""
    from largeforge.sources.importer import import_model

    target = import_model(source, output, dtype=dtype, overwrite=overwrite)
    Console(highlight=False).print(f"imported {source} -> {target}")


def register(app: typer.Typer) -> None:
    app.command("import")(import_command)
