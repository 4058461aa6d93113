"""`largeforge compare`: evaluate several models on the same data and write an HTML report.

    largeforge compare --models A B [C ...] --data FILE --metrics perplexity,rougeL \\
        --output report.html [--max-examples N] [--json results.json]

Two models make an A/B test. Click options take one value each, so the models after the first
arrive as extra arguments; `--models A --models B` works too, and the order is kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from largeforge.evaluation.compare import Comparison

DEFAULT_METRICS = "perplexity,rouge"


def compare_command(
    models: list[str] = typer.Option(
        ..., "--models", "-m",
        help="Two or more models (model dirs, run dirs or hub ids): --models A B [C ...].",
    ),
    more_models: list[str] | None = typer.Argument(
        None, hidden=True, show_default=False, metavar="MODEL"),
    data: str = typer.Option(..., "--data", "-d", help="Evaluation data file."),
    output: Path = typer.Option(..., "--output", "-o", help="The HTML report to write."),
    metrics: list[str] = typer.Option(
        [DEFAULT_METRICS], "--metrics",
        help="Comma-separated or repeated: perplexity (also gives loss), rouge (rouge1, rouge2, "
             "rougeL), bleu, chrf, exact_match. Generation metrics need instruction data.",
    ),
    max_examples: int | None = typer.Option(
        None, "--max-examples", min=1, help="Use only the first N examples."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1,
                                       help="Most tokens generated per example."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Examples per batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    chat_template: str | None = typer.Option(
        None, "--chat-template",
        help="A built-in template name or a Jinja file, for models without a chat template."),
    json_output: Path | None = typer.Option(
        None, "--json", help="Also write every result and the comparison as JSON."),
    title: str = typer.Option("Model comparison", "--title", help="The report's title."),
) -> None:
    """Compare models on one data set: a metrics table with the best marked, samples side by
    side and the loss curves of run directories, as one offline HTML page."""
    from rich.markup import escape

    from largeforge.evaluation.compare import compare, compare_labels
    from largeforge.runs import is_run_dir
    from largeforge.runs.report import check_output_file

    all_models = [*models, *(more_models or [])]
    check_output_file(output)  # before anything else; `compare` checks both outputs again

    err = Console(stderr=True, highlight=False)
    labels = compare_labels(len(all_models))

    def on_model(index: int, model: str) -> None:
        err.print(f"evaluating {labels[index]} ({index + 1}/{len(all_models)}): {escape(model)}")

    run_dirs = {ref: Path(ref) for ref in all_models if is_run_dir(Path(ref))}
    outcome = compare(all_models, data, output, metrics=metrics, max_examples=max_examples,
                      max_new_tokens=max_new_tokens, batch_size=batch_size, device=device,
                      chat_template=chat_template, json_output=json_output, title=title,
                      run_dirs=run_dirs, on_model=on_model)
    console = Console(highlight=False)
    console.print(_table(outcome.results, outcome.comparison))
    for label, result in zip(outcome.comparison.labels, outcome.results, strict=True):
        console.print(f"{label}: {escape(result.model)}", soft_wrap=True)
    console.print(f"report: {outcome.report}", soft_wrap=True)
    if outcome.json is not None:
        console.print(f"results: {outcome.json}", soft_wrap=True)


def _table(results: list[Any], comparison: Comparison) -> Any:
    """Metrics per model (A, B, ... named below the table), the best marked with `*`."""
    from rich.table import Table

    from largeforge.runs.report import fmt

    table = Table(title="* best (ties: all marked)", title_justify="left")
    table.add_column("")
    for name in comparison.metric_names:
        arrow = {True: " ↑", False: " ↓"}.get(comparison.higher_is_better[name], "")
        table.add_column(name + arrow, justify="right", no_wrap=True)
    for index, (label, result) in enumerate(zip(comparison.labels, results, strict=True)):
        cells = []
        for name in comparison.metric_names:
            text = fmt(result.metrics.get(name))
            cells.append(f"[bold]{text} *[/]" if comparison.is_best(name, index) else text)
        table.add_row(label, *cells)
    return table


def register(app: typer.Typer) -> None:
    app.command("compare")(compare_command)
