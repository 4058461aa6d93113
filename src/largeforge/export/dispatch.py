"""`export(model, format=..., output=..., **options)`: one entry point for every export format,
as `largeforge export` uses it.

Each format has its own function (`export_hf`, `export_gguf`, `export_ollama`, `export_onnx`,
`export_torchscript`); this module checks the options that do not need the model (the format,
the dtype, the options a format takes, the output) and calls the right one. `plan_export` does
the checks alone and returns an `ExportPlan` whose `run()` writes the export, so a caller can say
what is about to happen between the two. Importing this module imports no torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from largeforge.errors import LargeForgeError

FORMATS: tuple[str, ...] = ("hf", "gguf", "ollama", "onnx", "torchscript")
# ollama: Q8_0 (half the size of f16; perplexity within 0.1% of F32 in tests/test_export_gguf);
# a plain GGUF keeps f16.
DEFAULT_DTYPES: dict[str, str] = {"hf": "float32", "onnx": "float32", "torchscript": "float32",
                                  "gguf": "f16", "ollama": "q8_0"}
# The options each format takes beyond dtype and overwrite.
FORMAT_OPTIONS: dict[str, tuple[str, ...]] = {
    "hf": ("max_shard_size",),
    "onnx": ("opset", "kv_cache"),
    "torchscript": (),
    "gguf": ("eval_text", "add_bos", "chat_template"),
    "ollama": ("eval_text", "chat_template", "temperature"),
}
# How the command line spells an option, for messages about options given to the wrong format.
_FLAGS = {"max_shard_size": "--max-shard-size", "opset": "--opset", "kv_cache": "--no-kv-cache",
          "eval_text": "--eval-text"}


def valid_dtypes(fmt: str) -> tuple[str, ...]:
    """The dtypes format `fmt` can write."""
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


@dataclass
class ExportPlan:
    """An export whose options are checked; `run()` writes it and returns the path written."""

    model: str
    format: str
    output: Path
    dtype: str
    overwrite: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # how long `run()` took

    def run(self) -> Path:
        """Write the export (a LoRA adapter is merged into its base first)."""
        start = time.perf_counter()
        target = Path(_write(self))
        self.seconds = time.perf_counter() - start
        return target


def plan_export(
    model: str | Path,
    format: str,
    output: str | Path,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    **options: Any,
) -> ExportPlan:
    """Check everything about an export that does not need the model, so a typo fails at once
    and writes nothing. See `export` for the arguments."""
    fmt = format.lower()
    chosen = dtype or DEFAULT_DTYPES.get(fmt, "")
    if fmt not in FORMATS:
        raise LargeForgeError(f"unknown format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    dtypes = valid_dtypes(fmt)
    if chosen not in dtypes:
        raise LargeForgeError(
            f"--dtype {chosen!r} is not valid for --format {fmt}; expected one of: "
            f"{', '.join(dtypes)}"
        )
    known = {name for names in FORMAT_OPTIONS.values() for name in names}
    unknown = sorted(set(options) - known)
    if unknown:
        raise LargeForgeError(f"unknown export option(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(known))}")
    given = {name: value for name, value in options.items()
             if value is not None and not (name == "kv_cache" and value is True)}
    for name in ("max_shard_size", "opset", "kv_cache"):  # the command line's order
        owners = [f for f, names in FORMAT_OPTIONS.items() if name in names]
        if name in given and fmt not in owners:
            raise LargeForgeError(f"{_FLAGS[name]} applies to --format {owners[0]} only, not {fmt}")
    eval_text = given.get("eval_text")
    if eval_text is not None:
        if fmt not in ("gguf", "ollama"):
            raise LargeForgeError(f"--eval-text applies to --format gguf and ollama, not {fmt}")
        from largeforge.export.quantize import read_eval_text

        given["eval_text"] = read_eval_text(eval_text)  # the file's text, checked once
    for name in given:
        if name not in FORMAT_OPTIONS[fmt]:
            raise LargeForgeError(f"{name} applies to format(s) "
                                  f"{', '.join(f for f, n in FORMAT_OPTIONS.items() if name in n)}"
                                  f" only, not {fmt}")
    if "max_shard_size" in given:
        from largeforge.export.hf import parse_shard_size

        parse_shard_size(given["max_shard_size"])
    if "opset" in given:
        from largeforge.export.onnx_export import check_opset

        check_opset(given["opset"])
    from largeforge.runs import resolve_model_dir
    from largeforge.staging import check_output

    target = Path(output)
    check_output(target, overwrite=overwrite, source=resolve_model_dir(str(model)))
    return ExportPlan(str(model), fmt, target, chosen, overwrite, given)


def export_model(
    model: str | Path,
    format: str,
    output: str | Path,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    **options: Any,
) -> Path:
    """Export `model` (a model dir, run dir, LoRA adapter dir or hub id; an adapter is merged
    into its base first) as `format` to `output`; returns the path written.

    - `format`: hf, gguf, ollama, onnx or torchscript.
    - `dtype`: hf/torchscript: float32, float16, bfloat16; onnx: float32, float16; gguf/ollama:
      f32, f16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k. Default: `DEFAULT_DTYPES[format]`.
    - `overwrite`: replace an output that holds something.
    - `options` (each for the formats named): `max_shard_size` (hf, "5GB"), `opset` (onnx),
      `kv_cache` (onnx, default True), `eval_text` (gguf, ollama: a UTF-8 text file for the
      perplexity of a quantised type against F16), `add_bos` (gguf), `chat_template` (gguf,
      ollama: a built-in template name), `temperature` (ollama).
    """
    return plan_export(model, format, output, dtype=dtype, overwrite=overwrite, **options).run()


def _write(plan: ExportPlan) -> Path:
    opts = plan.options
    if plan.format == "hf":
        from largeforge.export.hf import DEFAULT_SHARD_SIZE, export_hf

        return export_hf(plan.model, plan.output, dtype=plan.dtype, overwrite=plan.overwrite,
                         max_shard_size=opts.get("max_shard_size") or DEFAULT_SHARD_SIZE)
    if plan.format == "onnx":
        from largeforge.export.onnx_export import export_onnx

        return export_onnx(plan.model, plan.output, dtype=plan.dtype, opset=opts.get("opset"),
                           kv_cache=opts.get("kv_cache", True), overwrite=plan.overwrite)
    if plan.format == "torchscript":
        from largeforge.export.torchscript import export_torchscript

        return export_torchscript(plan.model, plan.output, dtype=plan.dtype,
                                  overwrite=plan.overwrite)
    if plan.format == "gguf":
        from largeforge.export.gguf import export_gguf

        return export_gguf(plan.model, plan.output, dtype=plan.dtype, **opts)
    from largeforge.export.ollama import export_ollama

    return export_ollama(plan.model, plan.output, dtype=plan.dtype, overwrite=plan.overwrite,
                         **opts)
