"""`largeforge export` (hf, gguf, ollama, onnx, torchscript) and `largeforge quantize`.

Thin: check the flags that do not need the model, then call `largeforge.export.*`. A LoRA
adapter or LoRA run is merged into its base before any format is written.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from largeforge.errors import LargeForgeError

FORMATS = ("hf", "gguf", "ollama", "onnx", "torchscript")
# ollama: Q8_0 (half the size of f16; perplexity within 0.1% of F32 in tests/test_export_gguf);
# a plain GGUF keeps f16.
DEFAULT_DTYPES = {"hf": "float32", "onnx": "float32", "torchscript": "float32",
                  "gguf": "f16", "ollama": "q8_0"}


def valid_dtypes(fmt: str) -> tuple[str, ...]:
    if fmt == "hf":
        from largeforge.export.hf import HF_DTYPES

        return tuple(HF_DTYPES)
    if fmt == "onnx":
        from largeforge.export.onnx_export import ONNX_DTYPES

        return tuple(ONNX_DTYPES)
    if fmt == "torchscript":
        from largeforge.export.torchscript import TORCHSCRIPT_DTYPES

        return tuple(TORCHSCRIPT_DTYPES)
    from largeforge.export.gguf import DTYPES

    return tuple(DTYPES)


def _check_flags(fmt: str, dtype: str, max_shard_size: str | None, opset: int | None,
                 no_kv_cache: bool, eval_text: Path | None = None) -> None:
    """Every flag checked before anything is loaded, so a typo fails at once."""
    if fmt not in FORMATS:
        raise LargeForgeError(f"unknown format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    dtypes = valid_dtypes(fmt)
    if dtype not in dtypes:
        raise LargeForgeError(
            f"--dtype {dtype!r} is not valid for --format {fmt}; expected one of: "
            f"{', '.join(dtypes)}"
        )
    only = {"--max-shard-size": ("hf", max_shard_size is not None),
            "--opset": ("onnx", opset is not None),
            "--no-kv-cache": ("onnx", no_kv_cache)}
    for flag, (owner, given) in only.items():
        if given and fmt != owner:
            raise LargeForgeError(f"{flag} applies to --format {owner} only, not {fmt}")
    if eval_text is not None:
        if fmt not in ("gguf", "ollama"):
            raise LargeForgeError(f"--eval-text applies to --format gguf and ollama, not {fmt}")
        from largeforge.export.quantize import read_eval_text

        read_eval_text(eval_text)
    if max_shard_size is not None:
        from largeforge.export.hf import parse_shard_size

        parse_shard_size(max_shard_size)
    if opset is not None:
        from largeforge.export.onnx_export import check_opset

        check_opset(opset)


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
    from largeforge.export.source import check_output
    from largeforge.runs import resolve_model_dir

    fmt = fmt.lower()
    chosen = dtype or DEFAULT_DTYPES.get(fmt, "")
    _check_flags(fmt, chosen, max_shard_size, opset, no_kv_cache, eval_text)
    check_output(output, overwrite=overwrite, source=resolve_model_dir(model))
    err = Console(stderr=True, highlight=False)
    err.print(f"exporting {model} as {fmt} ({chosen}) ...")
    start = time.perf_counter()
    if fmt == "hf":
        from largeforge.export.hf import DEFAULT_SHARD_SIZE, export_hf

        target = export_hf(model, output, dtype=chosen, overwrite=overwrite,
                           max_shard_size=max_shard_size or DEFAULT_SHARD_SIZE)
    elif fmt == "onnx":
        from largeforge.export.onnx_export import export_onnx

        target = export_onnx(model, output, dtype=chosen, opset=opset,
                             kv_cache=not no_kv_cache, overwrite=overwrite)
    elif fmt == "torchscript":
        from largeforge.export.torchscript import export_torchscript

        target = export_torchscript(model, output, dtype=chosen, overwrite=overwrite)
    elif fmt == "gguf":
        from largeforge.export.gguf import export_gguf

        target = export_gguf(model, output, dtype=chosen, eval_text=_text(eval_text))
    else:
        from largeforge.export.ollama import export_ollama

        target = export_ollama(model, output, dtype=chosen, overwrite=overwrite,
                               eval_text=_text(eval_text))
    out = Console(highlight=False)
    out.print(f"exported {model} as {fmt} ({chosen}) -> {target} "
              f"in {time.perf_counter() - start:.1f} s")
    if fmt in ("gguf", "ollama"):
        _print_quantization(out, Path(target))


def _text(eval_text: Path | None) -> str | None:
    from largeforge.export.quantize import read_eval_text

    return None if eval_text is None else read_eval_text(eval_text)


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
    from largeforge.export.source import check_output
    from largeforge.runs import resolve_model_dir

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
