"""`largeforge eval`: perplexity, generation metrics and lm-eval harness tasks of a model.

The metrics table goes to stdout; loading messages go to stderr. Every input is checked before
the model is loaded, and results.json is written only once everything has run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from largeforge.errors import LargeForgeError


def _split_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


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


def _run_tasks(
    model: str, tasks: list[str], include_path: Path | None, limit: int | None,
    num_fewshot: int | None, batch_size: int, device: str,
) -> dict[str, dict[str, float]]:
    from largeforge.evaluation.harness import run_harness

    return run_harness(model, tasks, include_path=include_path, limit=limit,
                       num_fewshot=num_fewshot, batch_size=batch_size, device=device)


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
    from largeforge.evaluation.evaluate import (
        check_eval_inputs,
        check_output_path,
        evaluate_model,
        notes,
        parse_metrics,
        results_document,
        write_results,
    )
    from largeforge.runs import resolve_model_dir

    task_list = _split_list(tasks)
    if data is None and not task_list:
        raise LargeForgeError("give --data FILE, --tasks a,b, or both")
    metric_list = parse_metrics(metrics) if data is not None else []
    if output is not None:
        check_output_path(output)
    if include_path is not None and not include_path.is_dir():
        raise LargeForgeError(f"--include-path {include_path} is not a directory")
    if (include_path or limit is not None or num_fewshot is not None) and not task_list:
        raise LargeForgeError("--include-path, --limit and --num-fewshot go with --tasks")
    for name, value, least in (("--limit", limit, 1), ("--num-fewshot", num_fewshot, 0),
                               ("--batch-size", batch_size, 1),
                               ("--max-new-tokens", max_new_tokens, 1)):
        if value is not None and value < least:
            raise LargeForgeError(f"{name} must be >= {least}, got {value}")
    if not temperature >= 0:
        raise LargeForgeError(f"--temperature must be >= 0 (0 is greedy), got {temperature}")
    resolve_model_dir(model)  # a missing model fails before anything is read or loaded

    if data is not None:  # the data is read and checked before any long work starts
        check_eval_inputs(data, metric_list, max_examples=max_examples, batch_size=batch_size,
                          device=device, chat_template=chat_template)

    err = Console(stderr=True, highlight=False)
    out = Console(highlight=False)
    task_results = None
    if task_list:
        err.print(f"running harness tasks {', '.join(task_list)} ...")
        task_results = _run_tasks(model, task_list, include_path, limit, num_fewshot,
                                  batch_size, device)
    result = None
    if data is not None:
        start = time.perf_counter()
        result = evaluate_model(
            model, data, metric_list, max_examples=max_examples, max_new_tokens=max_new_tokens,
            batch_size=batch_size, temperature=temperature, device=device, seed=seed,
            chat_template=chat_template,
        )
        err.print(f"evaluated {model} on {data} in {time.perf_counter() - start:.1f} s")
        for note in notes(result):
            err.print(f"note: {note}")

    out.print(f"{model}" + (f" on {data}" if data else ""), soft_wrap=True)
    out.print(metrics_table(
        result.num_examples if result is not None else None,
        result.metrics if result is not None else {},
        task_results,
    ))
    if output is not None:
        settings: dict[str, Any] = {
            "metrics": metric_list, "max_examples": max_examples,
            "max_new_tokens": max_new_tokens, "batch_size": batch_size,
            "temperature": temperature, "seed": seed, "chat_template": chat_template,
            "device": device, "tasks": task_list, "include_path":
            str(include_path) if include_path else None, "limit": limit,
            "num_fewshot": num_fewshot,
        }
        write_results(output, results_document(result, model=model, data=data,
                                               settings=settings, tasks=task_results))
        err.print(f"results written to {output}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
