"""`largeforge config show`: the resolved recipe and where each value came from."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from largeforge.cli import recipe_options as ro


def show(
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
    fmt: str = typer.Option("table", "--format", help="table, yaml or json"),
    sft: bool = typer.Option(
        False, "--sft", help="Resolve as `train sft` does, over its own defaults."
    ),
) -> None:
    """Print the resolved recipe: defaults < file < environment < flags < --set."""
    flags = dict(
        data=data, preset=preset, tokenizer=tokenizer, name=name, output_dir=output_dir,
        max_steps=max_steps, batch_size=batch_size, lr=lr, seq_len=seq_len,
    )
    if sft:
        from largeforge.errors import LargeForgeError
        from largeforge.training.sft import resolve_sft_recipe

        if strategy or strategy_file:
            raise LargeForgeError("--sft takes --config, not --strategy")
        resolved = resolve_sft_recipe(
            config, flags=ro.dotted_flags(**flags), overrides=overrides or [], require=False
        )
    else:
        resolved = ro.resolve(config, strategy, strategy_file, overrides, **flags)
    if fmt == "yaml":
        print(resolved.recipe.to_yaml(), end="")
        return
    if fmt == "json":
        rows = [{"key": k, "value": v, "source": s} for k, v, s in resolved.rows()]
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="resolved recipe")
    table.add_column("key")
    table.add_column("value")
    table.add_column("from")
    for key, value, source in resolved.rows():
        style = "dim" if source == "default" else None
        table.add_row(key, json.dumps(value), source, style=style)
    Console(width=160).print(table)


def register(app: typer.Typer) -> None:
    config_app = typer.Typer(help="Inspect recipes.", no_args_is_help=True)
    config_app.command("show")(show)
    app.add_typer(config_app, name="config")
