"""`largeforge eval`: perplexity, generation metrics and lm-eval harness tasks of a model.

Thin over `largeforge.evaluate` (`largeforge.evaluation.evaluate.evaluate`), which checks,
runs and writes; this module prints.

The metrics table goes to stdout; loading messages go to stderr. Every input is checked before
the model is loaded, and results.json is written only once everything has run.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def _format(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"


def metrics_table(
    num_examples: int | None,
    metrics: dict[str, float],
    tasks: dict[str, dict[str, float]] | None = None,
) -> Table:
    """The table `eval` prints: examples, metrics, then harness task metrics."""
    from largeforge.evaluation.evaluate import HIGHER_IS_BETTER

    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("better")
    if num_examples is not None:
        table.add_row("examples", f"{num_examples:,}", "")
    for name, value in metrics.items():
        direction = HIGHER_IS_BETTER.get(name)
        better = "" if direction is None else "higher" if direction else "lower"
        table.add_row(name, _format(value), better)
    for task, values in (tasks or {}).items():
        for name, value in values.items():
            shown = _format(float(value)) if isinstance(value, (int, float)) else str(value)
            table.add_row(f"{task} {name}", shown, "")
    return table


def eval_command(
    model: str = typer.Option(
        ..., "--model", "-m", help="Model directory, run directory, LoRA adapter or hub id."
    ),
    data: str | None = typer.Option(
        None, "--data", "-d",
        help="Text (.txt, or JSONL with a text field: perplexity only) or instruction/chat "
        "data (alpaca, sharegpt, messages).",
    ),
    metrics: str = typer.Option(
        "perplexity", "--metrics",
        help="Comma-separated: perplexity, rouge, bleu, chrf, exact_match.",
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Write the results as JSON to this file."
    ),
    max_examples: int | None = typer.Option(
        None, "--max-examples", help="Evaluate on the first N examples only."
    ),
    max_new_tokens: int = typer.Option(
        64, "--max-new-tokens", help="Most tokens per generated answer."
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples per forward pass."),
    temperature: float = typer.Option(
        0.0, "--temperature", help="Sampling temperature for answers; 0 is greedy."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed for sampled answers."),
    chat_template: str | None = typer.Option(
        None, "--chat-template",
        help="Built-in template name or Jinja file (default: the tokenizer's own).",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    tasks: str | None = typer.Option(
        None, "--tasks", help="Comma-separated lm-eval harness tasks (e.g. hellaswag,arc_easy)."
    ),
    include_path: Path | None = typer.Option(
        None, "--include-path", help="A directory of extra lm-eval task YAML files."
    ),
    limit: int | None = typer.Option(
        None, "--limit", help="Harness tasks: at most N examples per task."
    ),
    num_fewshot: int | None = typer.Option(
        None, "--num-fewshot", help="Harness tasks: number of few-shot examples."
    ),
) -> None:
    """Evaluate a model: perplexity and generation metrics on a data file, and/or lm-eval
    harness tasks. Prints a table; --output writes results.json."""
    from largeforge.evaluation.evaluate import evaluate

    err = Console(stderr=True, highlight=False)
    out = Console(highlight=False)
    evaluation = evaluate(
        model, data, metrics, tasks=tasks, include_path=include_path, limit=limit,
        num_fewshot=num_fewshot, max_examples=max_examples, max_new_tokens=max_new_tokens,
        batch_size=batch_size, temperature=temperature, seed=seed, chat_template=chat_template,
        device=device, output=output, on_status=err.print,
    )
    for note in evaluation.notes():
        err.print(f"note: {note}")
    out.print(f"{model}" + (f" on {data}" if data else ""), soft_wrap=True)
    out.print(metrics_table(evaluation.num_examples, evaluation.metrics, evaluation.tasks))
    if output is not None:
        err.print(f"results written to {output}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
