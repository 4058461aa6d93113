"""Command-line options shared by every command that reads a recipe."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:  # imported when used, so `largeforge --help` does not load torch
    from largeforge.config import ResolvedRecipe

ConfigOpt = typer.Option(None, "--config", "-c", help="A YAML file holding one recipe.")
StrategyOpt = typer.Option(None, "--strategy", help="Name of a strategy in --strategy-file.")
StrategyFileOpt = typer.Option(None, "--strategy-file", help="A YAML file of named strategies.")
SetOpt = typer.Option(
    None, "--set", help="Override any recipe key: section.key=value (repeatable)."
)
DataOpt = typer.Option(None, "--data", help="Training data: file, directory or glob (repeatable).")
PresetOpt = typer.Option(None, "--preset", help="Model preset: tiny, small, medium, base.")
TokenizerOpt = typer.Option(None, "--tokenizer", help="An existing tokenizer directory.")
NameOpt = typer.Option(None, "--name", help="Run name: the run goes to <output-dir>/<name>.")
OutputDirOpt = typer.Option(None, "--output-dir", help="Parent directory of runs (default runs).")
MaxStepsOpt = typer.Option(None, "--max-steps", help="Optimizer steps to train.")
BatchSizeOpt = typer.Option(None, "--batch-size", help="Sequences per micro-batch.")
LrOpt = typer.Option(None, "--lr", help="Peak learning rate.")
SeqLenOpt = typer.Option(None, "--seq-len", help="Training sequence length in tokens.")
PrecisionOpt = typer.Option(None, "--precision", help="auto, fp32, bf16, fp16.")
ResumeOpt = typer.Option(
    None, "--resume", metavar="[PATH]",
    help="Continue from the latest checkpoint (no value), or from a checkpoint or run dir.",
)
OverwriteRunOpt = typer.Option(False, "--overwrite", help="Replace an existing run.")


FLAG_KEYS = {
    "data": "data.train",
    "preset": "model.preset",
    "tokenizer": "tokenizer.path",
    "name": "output.name",
    "output_dir": "output.dir",
    "max_steps": "train.max_steps",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "seq_len": "data.seq_len",
}


def dotted_flags(**flags: Any) -> dict[str, Any]:
    """The shared flags that were given, as dotted recipe keys."""
    return {FLAG_KEYS[k]: v for k, v in flags.items() if v not in (None, [])}


def resolve(
    config: Path | None,
    strategy: str | None,
    strategy_file: Path | None,
    overrides: list[str] | None,
    **flags: Any,
) -> ResolvedRecipe:
    """Map the shared flags onto their recipe keys and resolve all layers."""
    from largeforge.config import load_recipe

    return load_recipe(
        config,
        strategy=strategy,
        strategy_file=strategy_file,
        flags=dotted_flags(**flags),
        overrides=overrides or [],
    )
