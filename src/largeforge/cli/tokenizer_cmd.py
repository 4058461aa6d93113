"""`largeforge tokenizer train`: a byte-level BPE from your own text."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from largeforge.errors import LargeForgeError

tokenizer_app = typer.Typer(help="Train tokenizers.", no_args_is_help=True)


@tokenizer_app.command("train")
def train_command(
    data: list[str] = typer.Option(
        ..., "--data", help="Text: file, directory or glob (repeatable)."
    ),
    vocab_size: int = typer.Option(4096, "--vocab-size", help="Tokens in the vocabulary."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the tokenizer."),
    text_field: str = typer.Option("text", "--text-field", help="Field of JSON/JSONL records."),
    min_frequency: int = typer.Option(2, "--min-frequency", help="Least count of a merged pair."),
) -> None:
    """Train a byte-level BPE tokenizer (saved as a Hugging Face tokenizer directory)."""
    from largeforge.data.sources import iter_documents, resolve_sources
    from largeforge.tokenizer import check_vocab_size, train_tokenizer

    check_vocab_size(vocab_size)  # before reading any data
    if output.exists() and any(output.iterdir()):
        raise LargeForgeError(f"{output} already exists and is not empty; choose another --output")
    sources = resolve_sources(data)
    stats: dict[str, int] = {}
    tokenizer = train_tokenizer(
        iter_documents(sources, text_field=text_field, stats=stats), vocab_size, output,
        min_frequency=min_frequency,
    )
    Console().print(
        f"tokenizer: {len(tokenizer)} tokens from {stats['documents']:,} documents -> {output}"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(tokenizer_app, name="tokenizer")
