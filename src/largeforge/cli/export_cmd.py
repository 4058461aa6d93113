"""`largeforge export` (hf, gguf, ollama, onnx, torchscript) and `largeforge quantize`.

Thin: `largeforge.export.dispatch.plan_export` checks the flags that do not need the model,
its `run()` calls the format's `largeforge.export.*` function; this module prints. A LoRA
adapter or LoRA run is merged into its base before any format is written.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

# Literal here so `largeforge --help` imports nothing: largeforge.export.dispatch.FORMATS.
FORMATS = ("hf", "gguf", "ollama", "onnx", "torchscript")


def export_command(
    model: str = typer.Argument(..., help="Model dir, run dir, LoRA adapter dir or hub id."),
    fmt: str = typer.Option(..., "--format", "-f", help=f"One of: {', '.join(FORMATS)}."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the export."),
    dtype: str | None = typer.Option(
        None, "--dtype",
        help="hf/torchscript: float32, float16, bfloat16; onnx: float32, float16; "
        "gguf/ollama: f32, f16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k (quantised by llama.cpp). "
        "Default: float32 (gguf: f16, ollama: q8_0).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output."),
    max_shard_size: str | None = typer.Option(
        None, "--max-shard-size", help="hf: largest safetensors shard (default 5GB)."
    ),
    opset: int | None = typer.Option(None, "--opset", help="onnx: opset version (18 or later)."),
    no_kv_cache: bool = typer.Option(
        False, "--no-kv-cache", help="onnx: logits only, no past/present key-value tensors."
    ),
    eval_text: Path | None = typer.Option(
        None, "--eval-text", help="gguf/ollama: UTF-8 text for the perplexity of a quantised "
        "type against F16 (default: the Python documentation)."
    ),
) -> None:
    """Export a model (a LoRA adapter is merged into its base first)."""
    from largeforge.export.dispatch import plan_export

    plan = plan_export(model, fmt, output, dtype=dtype, overwrite=overwrite,
                       max_shard_size=max_shard_size, opset=opset, kv_cache=not no_kv_cache,
                       eval_text=eval_text)
    err = Console(stderr=True, highlight=False)
    err.print(f"exporting {model} as {plan.format} ({plan.dtype}) ...")
    target = plan.run()
    out = Console(highlight=False)
    out.print(f"exported {model} as {plan.format} ({plan.dtype}) -> {target} "
              f"in {plan.seconds:.1f} s")
    if plan.format in ("gguf", "ollama"):
        _print_quantization(out, target)


def _print_quantization(out: Console, target: Path) -> None:
    """The perplexity line of a quantised GGUF (and where its report is)."""
    from largeforge.export.gguf_quantize import read_report, report_path

    gguf_file = target / "model.gguf" if target.is_dir() else target
    report = read_report(gguf_file)
    if report is not None:
        out.print(f"{report.summary()} -> {report_path(gguf_file)}")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def quantize_command(
    model: str = typer.Argument(..., help="Model dir, run dir, LoRA adapter dir or hub id."),
    method: str = typer.Option(..., "--method", help="int8, int4 (CPU or CUDA); awq, gptq."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the quantised model."),
    eval_text: Path | None = typer.Option(
        None, "--eval-text", help="UTF-8 text to measure perplexity on, before and after."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output."),
) -> None:
    """Quantise the weights (bitsandbytes int8 or NF4 int4) into a model directory that
    transformers and `largeforge generate` load; report perplexity and size before and after."""
    from largeforge.export.quantize import REPORT_FILE, check_method, quantize, read_eval_text
    from largeforge.runs import resolve_model_dir
    from largeforge.staging import check_output

    method = method.lower()
    check_method(method)
    if eval_text is not None:
        read_eval_text(eval_text)
    check_output(output, overwrite=overwrite, source=resolve_model_dir(model))
    err = Console(stderr=True, highlight=False)
    err.print(f"quantising {model} to {method} ...")
    report = quantize(model, output, method=method, eval_text=eval_text, overwrite=overwrite)
    table = Table(title=f"{model} -> {output} ({report.scheme})")
    table.add_column("")
    table.add_column("weights on disk", justify="right")
    table.add_column("perplexity", justify="right")
    table.add_column("loss (nats/token)", justify="right")

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    table.add_row("before", _size(report.size_before), fmt(report.perplexity_before),
                  fmt(report.loss_before))
    table.add_row(f"after ({method})", _size(report.size_after), fmt(report.perplexity_after),
                  fmt(report.loss_after))
    out = Console(highlight=False)
    out.print(table)
    if report.perplexity_change is not None:
        out.print(f"perplexity {report.perplexity_change:+.2%} on {report.eval_tokens} tokens "
                  f"of {eval_text}; weights {report.size_after / report.size_before:.0%} "
                  "of the original")
    else:
        out.print("perplexity not measured (give --eval-text FILE)")
    out.print(f"report: {Path(output) / REPORT_FILE}")


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
    app.command("quantize")(quantize_command)
