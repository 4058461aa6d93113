"""`largeforge config show`: the resolved recipe and where each value came from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from largeforge.cli import recipe_options as ro


@ro.recipe_flags(*ro.TRAIN_FLAGS)
def show(
    config: Path | None = ro.ConfigOpt,
    strategy: str | None = ro.StrategyOpt,
    strategy_file: Path | None = ro.StrategyFileOpt,
    overrides: list[str] | None = ro.SetOpt,
    flags: dict[str, Any] = ro.GIVEN_FLAGS,
    fmt: str = typer.Option("table", "--format", help="table, yaml or json"),
    sft: bool = typer.Option(
        False, "--sft", help="Resolve as `train sft` does, over its own defaults."
    ),
) -> None:
    """Print the resolved recipe: defaults < file < environment < flags < --set.

    It takes the recipe flags of `train`, so it shows what `train` would resolve from the same
    command line (with --sft: what `train sft` would)."""
    if sft:
        from largeforge.errors import LargeForgeError
        from largeforge.training.sft import resolve_sft_recipe

        if strategy or strategy_file:
            raise LargeForgeError("--sft takes --config, not --strategy")
        resolved = resolve_sft_recipe(
            config, flags=flags, overrides=overrides or [], require=False
        )
    else:
        resolved = ro.resolve(config, strategy, strategy_file, overrides, flags)
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
