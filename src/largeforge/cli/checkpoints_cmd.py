"""`largeforge checkpoints cleanup`: free the disk a run's surplus checkpoints take;
`largeforge checkpoints consolidate`: a sharded (FSDP) checkpoint as an HF model directory."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

checkpoints_app = typer.Typer(help="Manage a run's checkpoints.", no_args_is_help=True)


@checkpoints_app.command("cleanup")
def cleanup_command(
    run: str = typer.Argument(..., help="A run: its directory or its name in the registry."),
    keep_best: int = typer.Option(
        1, "--keep-best", help="Keep this many checkpoints with the lowest validation loss."
    ),
    keep_last: int = typer.Option(1, "--keep-last", help="Keep this many most recent ones."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print what would be removed; remove nothing."
    ),
    registry: Path | None = typer.Option(
        None, "--registry", help="Registry to look a run name up in (default: "
        "$LARGEFORGE_REGISTRY, else ~/.largeforge/registry.db)."
    ),
) -> None:
    """Remove checkpoints/step-N/ directories but the best, the last and the one `latest`
    names (resume needs it); best/ and final/ are never touched. Prints each directory removed
    with its size, and the total freed."""
    from largeforge.errors import LargeForgeError
    from largeforge.runs import (
        Checkpoint,
        Registry,
        cleanup_checkpoints,
        format_size,
        resolve_run_dir,
    )

    for flag, value in (("--keep-best", keep_best), ("--keep-last", keep_last)):
        if value < 0:  # checked before the registry is opened
            raise LargeForgeError(f"{flag} must be 0 or more, not {value}")
    reg = Registry(registry, create=False) if registry is not None else None
    run_dir = resolve_run_dir(run, reg)
    console = Console(highlight=False)
    verb = "would remove" if dry_run else "removed"

    def report(checkpoint: Checkpoint) -> None:
        console.print(f"{verb} {checkpoint.path} ({format_size(checkpoint.size)}, "
                      f"{checkpoint.size:,} bytes)", soft_wrap=True)

    result = cleanup_checkpoints(run_dir, keep_best, keep_last, dry_run=dry_run,
                                 on_remove=report)
    for checkpoint in result.plan.checkpoints:
        if checkpoint.path in result.plan.keep:
            reasons = ", ".join(result.plan.keep[checkpoint.path])
            console.print(f"kept {checkpoint.path.name}: {reasons}", soft_wrap=True)
    total = f"{format_size(result.freed)} ({result.freed:,} bytes)"
    if dry_run:
        console.print(f"dry run: would free {total} in {len(result.removed)} checkpoint(s)")
    else:
        console.print(f"freed {total} in {len(result.removed)} checkpoint(s)")


@checkpoints_app.command("consolidate")
def consolidate_command(
    run: str = typer.Argument(
        ..., help="A run (its directory or registry name), or a checkpoint directory."
    ),
    checkpoint: str = typer.Option(
        "latest", "--checkpoint", help="Which checkpoint of the run: step-N or latest."
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Directory to write (default RUN/consolidated/step-N)."
    ),
    registry: Path | None = typer.Option(
        None, "--registry", help="Registry to look a run name up in (default: "
        "$LARGEFORGE_REGISTRY, else ~/.largeforge/registry.db)."
    ),
) -> None:
    """Turn a sharded (FSDP) checkpoint into a Hugging Face model directory (config.json,
    model.safetensors, tokenizer), in one process: every other command then takes it."""
    from largeforge.runs import CONSOLIDATED_DIR, STATE_FILE, Registry, RunDir, resolve_run_dir
    from largeforge.training.distributed import consolidate_checkpoint, run_checkpoint

    path = Path(run).expanduser()
    if (path / STATE_FILE).is_file():  # a checkpoint directory itself
        ckpt = path
        default_output = path.parent.parent / CONSOLIDATED_DIR / path.name
    else:
        reg = Registry(registry, create=False) if registry is not None else None
        run_dir = resolve_run_dir(run, reg)
        ckpt = run_checkpoint(run_dir, checkpoint)
        default_output = RunDir(run_dir).consolidated / ckpt.name
    target = consolidate_checkpoint(ckpt, output or default_output)
    Console(highlight=False).print(f"consolidated {ckpt} -> {target}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(checkpoints_app, name="checkpoints")
