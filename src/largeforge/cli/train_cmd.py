"""`largeforge train` and `largeforge quickstart`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from largeforge.cli import recipe_options as ro

if TYPE_CHECKING:  # imported when used, so `largeforge --help` does not load torch
    from largeforge.training.loop import TrainResult


def train_command(
    config: Path | None = ro.ConfigOpt,
    strategy: str | None = ro.StrategyOpt,
    strategy_file: Path | None = ro.StrategyFileOpt,
    overrides: list[str] | None = ro.SetOpt,
    data: list[str] | None = ro.DataOpt,
    preset: str | None = ro.PresetOpt,
    tokenizer: str | None = ro.TokenizerOpt,
    name: str | None = ro.NameOpt,
    output_dir: str | None = ro.OutputDirOpt,
    max_steps: int | None = ro.MaxStepsOpt,
    batch_size: int | None = ro.BatchSizeOpt,
    lr: float | None = ro.LrOpt,
    seq_len: int | None = ro.SeqLenOpt,
    resume: str | None = typer.Option(
        None, "--resume", metavar="[PATH]",
        help="Continue from the latest checkpoint (no value), or from a checkpoint or run dir.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run."),
    verify_only: bool = typer.Option(
        False, "--verify-only", help="Check data, tokenizer, model and output; do not train."
    ),
) -> None:
    """Pretrain a Llama-style model on text, or train one on instruction and chat data
    (alpaca, sharegpt, messages), as the recipe says; or continue a run."""
    resolved = ro.resolve(
        config, strategy, strategy_file, overrides, data=data, preset=preset,
        tokenizer=tokenizer, name=name, output_dir=output_dir, max_steps=max_steps,
        batch_size=batch_size, lr=lr, seq_len=seq_len,
    )
    from largeforge.training.loop import train

    console = Console()
    result = train(
        resolved, resume=resume, overwrite=overwrite, verify_only=verify_only, console=console
    )
    if not result.verified_only:
        print_summary(result, console)


def print_summary(result: TrainResult, console: Console) -> None:
    console.print(f"[bold green]done[/]: {result.steps} steps in {result.run_dir}")
    if result.best_val_loss is not None:
        console.print(f"best val loss {result.best_val_loss:.4f} -> {result.best_dir}")
    if result.last_val_loss is not None:
        console.print(f"last val loss {result.last_val_loss:.4f}")
    if result.tokens_per_s:
        mfu = 100 * (result.mfu or 0)
        console.print(f"median {result.tokens_per_s:,.0f} tokens/s, MFU {mfu:.1f}%")
    console.print(f"model: {result.final_dir}")


def quickstart_command(
    overrides: list[str] | None = ro.SetOpt,
    output_dir: str | None = ro.OutputDirOpt,
) -> None:
    """Train a ~1M-parameter model on Python's own docs (no download), then sample from it."""
    from largeforge.quickstart import run_quickstart

    console = Console()
    console.rule("LargeForge quickstart: a tiny Llama trained on Python's documentation")
    result, samples = run_quickstart(overrides, output_dir=output_dir, console=console)
    print_summary(result, console)
    console.rule("samples")
    for sample in samples:
        console.print(sample, highlight=False, markup=False)
        console.print()
    console.print(
        f"next: largeforge generate --model {result.run_dir} --prompt 'Return the'"
    )


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("quickstart")(quickstart_command)
