"""`largeforge data validate|prepare|split|stats|synth`: check, clean, split, describe and
synthesise data. Thin over `largeforge.data` (`DatasetValidator`, `prepare_dataset`,
`split_dataset`, `compute_stats`, `SyntheticDataGenerator`); this module prints."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

data_app = typer.Typer(help="Check, clean, split and describe datasets.", no_args_is_help=True)

InputArg = typer.Argument(
    ..., help="Data: files (.jsonl .json .csv .parquet .txt .md), directories, globs, or a "
    "directory written by datasets' save_to_disk.", metavar="INPUT...",
)
FormatOpt = typer.Option(
    None, "--format", "-f",
    help="text, alpaca, sharegpt, messages or preference (default: detected).",
)
TextFieldOpt = typer.Option("text", "--text-field", help="The text field of records.")
EvalPercentOpt = typer.Option(
    10.0, "--eval-percent", help="Share of records for eval, by a stable hash of each record."
)
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace a non-empty output directory.")


@data_app.command("validate")
def validate_command(
    file: list[str] = typer.Argument(
        ..., help="Data: files (.jsonl .json .csv .parquet .txt .md), directories, globs, or a "
        "directory written by datasets' save_to_disk.", metavar="FILE...",
    ),
    format: str | None = typer.Option(
        None, "--format", "-f",
        help="text, alpaca, sharegpt, messages or preference (default: detected).",
    ),
    tokenizer: str | None = typer.Option(
        None, "--tokenizer", help="Tokenizer directory, to find samples over --max-length."
    ),
    max_length: int | None = typer.Option(
        None, "--max-length", help="Most tokens in one sample (with --tokenizer)."
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Write only the valid records here (JSONL)."
    ),
    text_field: str = typer.Option("text", "--text-field", help="The text field of records."),
) -> None:
    """Report every problem with file:line and a count per kind; exit 1 when any record is
    invalid. --output writes the valid records (as in the input, one JSON object a line)."""
    from largeforge.data.validate import DatasetValidator

    validator = DatasetValidator(format, text_field=text_field, tokenizer=tokenizer,
                                 max_length=max_length)
    report = validator.validate(file)
    for problem in report.problems:
        typer.echo(str(problem))
    console = Console(highlight=False)
    counts = report.counts()
    if counts:
        table = Table(title="problems")
        table.add_column("kind")
        table.add_column("count", justify="right")
        for kind, count in counts.items():
            table.add_row(kind, f"{count:,}")
        console.print(table)
    console.print(
        f"{report.total:,} {report.format} records: {len(report.valid):,} valid, "
        f"{report.invalid:,} invalid"
    )
    if output is not None:
        written = report.write_clean(output)
        reasons = ", ".join(f"{n:,} {kind}" for kind, n in report.dropped.most_common())
        console.print(
            f"wrote {written:,} valid records to {output}; dropped {report.invalid:,}"
            + (f" ({reasons})" if reasons else "")
        )
    if not report.ok:
        raise typer.Exit(1)


@data_app.command("prepare")
def prepare_command(
    inputs: list[str] = InputArg,
    output: Path = typer.Option(..., "--output", "-o", help="Directory for train/eval JSONL."),
    format: str | None = FormatOpt,
    text_field: str = TextFieldOpt,
    eval_percent: float = EvalPercentOpt,
    near_dedup: float = typer.Option(
        0.85, "--near-dedup", help="MinHash Jaccard threshold for near duplicates; 0 is off."
    ),
    min_chars: int = typer.Option(1, "--min-chars", help="Drop records with fewer characters."),
    max_chars: int | None = typer.Option(
        None, "--max-chars", help="Drop records with more characters."
    ),
    min_alpha_ratio: float = typer.Option(
        0.5, "--min-alpha-ratio", help="Least share of letters among non-space characters."
    ),
    normal_form: str = typer.Option("NFC", "--normal-form", help="Unicode normal form."),
    overwrite: bool = OverwriteOpt,
) -> None:
    """Normalise, strip control characters, remove exact and near duplicates, filter by
    quality and split train/eval; writes train.jsonl, eval.jsonl and report.json."""
    from largeforge.data.prepared import prepare_dataset

    prepared = prepare_dataset(
        inputs, output, format=format, text_field=text_field, eval_percent=eval_percent,
        near_dedup=near_dedup, min_chars=min_chars, max_chars=max_chars,
        min_alpha_ratio=min_alpha_ratio, normal_form=normal_form, overwrite=overwrite,
    )
    report = prepared.report
    assert report is not None
    table = Table(title=f"data prepare: {prepared.format}")
    table.add_column("step")
    table.add_column("records", justify="right")
    table.add_row("read", f"{report.records_in:,}")
    table.add_row("changed by normalisation", f"{report.normalized_changed:,}")
    table.add_row("removed: exact duplicates", f"{report.exact_duplicates:,}")
    for reason, count in sorted(report.quality.items()):
        table.add_row(f"removed: {reason}", f"{count:,}")
    table.add_row("removed: near duplicates", f"{report.near_duplicates:,}")
    table.add_row("train", f"{report.train:,}")
    table.add_row("eval", f"{report.eval:,}")
    Console(highlight=False).print(table)
    Console(highlight=False).print(f"wrote {output}/train.jsonl, eval.jsonl, report.json")


@data_app.command("split")
def split_command(
    inputs: list[str] = InputArg,
    output: Path = typer.Option(..., "--output", "-o", help="Directory for train/eval JSONL."),
    format: str | None = FormatOpt,
    text_field: str = TextFieldOpt,
    eval_percent: float = EvalPercentOpt,
    overwrite: bool = OverwriteOpt,
) -> None:
    """Split into train.jsonl and eval.jsonl by a stable hash: adding records later never
    moves old ones between the splits."""
    from largeforge.data.prepared import split_dataset

    split = split_dataset(inputs, output, format=format, text_field=text_field,
                          eval_percent=eval_percent, overwrite=overwrite)
    Console(highlight=False).print(
        f"{split.records_in:,} {split.format} records: {len(split.train):,} train, "
        f"{len(split.eval):,} eval -> {output}"
    )


@data_app.command("stats")
def stats_command(
    inputs: list[str] = InputArg,
    format: str | None = FormatOpt,
    text_field: str = TextFieldOpt,
    tokenizer: str | None = typer.Option(
        None, "--tokenizer", help="Measure lengths in this tokenizer's tokens (else characters)."
    ),
    output: Path = typer.Option(
        Path("data-stats.html"), "--output", "-o", help="Where to write the HTML report."
    ),
) -> None:
    """Histograms of lengths per field and turns per conversation, duplicates, field coverage,
    role counts and examples, as an HTML page; a summary table in the terminal."""
    from largeforge.data.prepared import load_dataset_records
    from largeforge.data.stats import compute_stats, write_html_report
    from largeforge.tokenizer import load_tokenizer

    kind, records = load_dataset_records(inputs, format, text_field=text_field)
    tok = load_tokenizer(tokenizer) if tokenizer else None
    stats = compute_stats(
        ({k: v for k, v in r.items() if k != "source"} for r in records), tok
    )
    table = Table(title=f"data stats: {kind}", show_header=False)
    for name, value in stats.summary_rows():
        table.add_row(name, value)
    console = Console(highlight=False)
    console.print(table)
    write_html_report(stats, output, title=f"data stats: {', '.join(inputs)}")
    console.print(f"report: {output}")


@data_app.command("synth")
def synth_command(
    prompts: Path = typer.Option(..., "--prompts", help="Prompts: .txt lines or JSON/JSONL."),
    teacher: str = typer.Option(
        ..., "--teacher", envvar="OPENAI_BASE_URL", help="An OpenAI-compatible base URL "
        "(http://host:port/v1; or OPENAI_BASE_URL) or a local model directory, run or hub id."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="JSONL to write (appended to)."),
    fmt: str = typer.Option("messages", "--format", help="alpaca or messages."),
    model: str | None = typer.Option(
        None, "--model", help="Model name at the endpoint (default: the first it lists)."
    ),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="OPENAI_API_KEY", help="Endpoint key (or OPENAI_API_KEY)."
    ),
    concurrency: int = typer.Option(4, "--concurrency", help="Requests in flight at once."),
    retries: int = typer.Option(3, "--retries", help="Retries per request, with backoff."),
    temperature: float = typer.Option(0.7, "--temperature"),
    max_tokens: int = typer.Option(256, "--max-tokens"),
    system: str | None = typer.Option(None, "--system", help="A system prompt for every ask."),
    seed: int | None = typer.Option(None, "--seed"),
) -> None:
    """Generate SFT data from a teacher; re-running skips the prompts already answered."""
    from largeforge.data.synth import SyntheticDataGenerator

    console = Console(highlight=False)
    generator = SyntheticDataGenerator(
        teacher, format=fmt, model=model, api_key=api_key, retries=retries,
        temperature=temperature, max_tokens=max_tokens, system=system, seed=seed,
        concurrency=concurrency,
    )
    report = generator.generate(
        prompts, output, on_record=lambda done, total: console.print(f"{done}/{total}", end="\r"),
    )
    console.print(
        f"{report.written} written, {report.skipped} already there, {len(report.failed)} failed "
        f"of {report.prompts} prompts -> {output}"
    )
    for problem in report.failed[:10]:
        console.print(f"  failed: {problem}")
    if report.failed:
        console.print("re-run the same command to retry the failed prompts")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
