"""`largeforge infer`: offline batch inference over a JSONL file, resumable.

Thin over `largeforge.inference.batch_infer`; the input and output are checked before the
(slow) model load, so a bad file fails at once. Messages go to stderr.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from largeforge.cli.generate_cmd import DeviceOpt, ModelOpt, SeedOpt, TemperatureOpt

if TYPE_CHECKING:
    from largeforge.inference.batch_infer import InferReport


def infer_command(
    model: str = ModelOpt,
    input: Path = typer.Option(
        ..., "--input", "-i",
        help='JSONL prompts: {"id"?, "prompt"} or {"id"?, "messages": [...]} per line.',
    ),
    output: Path = typer.Option(
        ..., "--output", "-o",
        help="JSONL results; a re-run skips the ids already there (resume).",
    ),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Requests generated at once."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Most tokens per output."),
    temperature: float = TemperatureOpt,
    seed: int | None = SeedOpt,
    chat: bool = typer.Option(
        False, "--chat",
        help="Send each prompt as a user message through the model's chat template "
        '("messages" records always use it).',
    ),
    device: str | None = DeviceOpt,
) -> None:
    """Generate an output for every prompt of a JSONL file, BATCH_SIZE at a time (continuous
    batching). Results are appended as they finish; run it again to resume after a stop."""
    from largeforge.errors import LargeForgeError
    from largeforge.inference.batch_infer import (
        check_output_path,
        read_finished,
        read_infer_records,
        run_infer,
    )
    from largeforge.inference.sampling import SamplingParams

    if batch_size < 1:
        raise LargeForgeError(f"--batch-size must be at least 1, got {batch_size}")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    records = read_infer_records(input)
    out = check_output_path(output, input)
    _, done, _ = read_finished(out)
    before = sum(1 for r in records if r.key in done)
    err = Console(stderr=True, highlight=False)
    if before:
        err.print(f"{before} of {len(records)} records are already in {out}; resuming")
    if before == len(records):
        err.print("nothing left to do")
        return

    from largeforge.cli.generate_cmd import _load

    loaded_model, tokenizer = _load(model, device, err)
    last = [time.monotonic()]

    def progress(report: InferReport) -> None:
        now = time.monotonic()
        if now - last[0] >= 5 or report.written + report.done_before == report.records:
            last[0] = now
            err.print(f"{report.done_before + report.written}/{report.records} records")

    report = run_infer(
        loaded_model, tokenizer, records, out, params, batch_size=batch_size, chat=chat,
        source=str(input), on_record=progress,
    )
    rate = report.completion_tokens / report.seconds if report.seconds else 0.0
    reasons = ", ".join(f"{n} {k}" for k, n in sorted(report.finish_reasons.items()))
    err.print(
        f"wrote {report.written} records to {out} ({report.done_before} done before) in "
        f"{report.seconds:.1f} s, {rate:.0f} tokens/s; finished: {reasons or 'none'}"
    )


def register(app: typer.Typer) -> None:
    app.command("infer")(infer_command)
