"""`largeforge merge`: fold a LoRA adapter into its base model."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console


def merge_command(
    adapter: Path = typer.Option(..., "--adapter", help="A PEFT adapter directory."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the merged model."),
    base: str | None = typer.Option(
        None, "--base", help="Base model: directory, run or hub id (default: the adapter's)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output."),
) -> None:
    """Write base + adapter as one Hugging Face model directory (no peft needed to load it)."""
    from largeforge.merge import merge_adapter

    target = merge_adapter(adapter, output, base=base, overwrite=overwrite)
    Console(highlight=False).print(f"merged {adapter} into {base or 'its base'} -> {target}")


def register(app: typer.Typer) -> None:
    app.command("merge")(merge_command)
