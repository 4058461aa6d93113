"""Weight quantisation for CPU (and CUDA) inference: int8 and int4 through bitsandbytes, with the
perplexity before and after on a text and the sizes on disk.

Why bitsandbytes (options tried on this project's CPU with torch 2.13 and transformers 5.23):

- bitsandbytes 0.50 (already our QLoRA dependency) runs both on CPU. `load_in_8bit` stores each
  weight row in int8 with its scale (LLM.int8(): the matmul quantises the activations per token
  and keeps outlier columns in 16 bits); `load_in_4bit` stores NF4 weights, two per byte, with
  per-block scales (themselves quantised: double quantisation) and dequantises them to the
  compute dtype, weight-only. transformers writes either with `save_pretrained` (safetensors +
  `quantization_config` in config.json) and loads it back with no extra argument, so the
  output is an ordinary model directory for `transformers`, `largeforge generate` and `serve`.
- torchao 0.18: int8 weight-only works, but its packed int4 layouts need CUDA or the mslk
  kernels, and its CPU int4 (`IntxWeightOnlyConfig`) keeps one weight per byte, no smaller than
  int8; installed, it also makes every transformers import print warnings. Not used.
- torch's dynamic quantisation (`quantize_dynamic`): int8 only, and its modules are pickled
  objects that `from_pretrained` cannot load. Not used.

AWQ and GPTQ calibrate and run with CUDA kernels (AutoAWQ, GPTQModel); no library runs them on
a CPU here, so they are refused with a message naming what to install on a CUDA machine.

bitsandbytes repacks a 4-bit weight for AVX512-BF16 CPUs in place the first time it runs and
unpacks it when saved; that round trip changes the weights (see `adapters.load_quantized_base`).
So the quantised model is saved before it ever runs, and the "after" perplexity is measured on
the directory as written, loaded back the way a user loads it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from largeforge.atomic_files import temp_dir
from largeforge.errors import LargeForgeError
from largeforge.export.source import check_choice, load_source
from largeforge.staging import check_output, save_tokenizer, staged_output

# The int8 matmul logs on every call that it casts fp32 inputs to fp16; that is how it works.
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

METHODS = ("int8", "int4", "awq", "gptq")
REPORT_FILE = "quantize_report.json"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
CUDA_ONLY = {
    "awq": ("AWQ", "AutoAWQ (pip install autoawq)"),
    "gptq": ("GPTQ", "GPTQModel (pip install gptqmodel)"),
}


@dataclass
class QuantizeReport:
    method: str
    library: str
    scheme: str  # what the weights became
    source: str
    output: str
    size_before: int  # bytes of weights on disk
    size_after: int
    eval_text: str | None = None
    eval_tokens: int | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    perplexity_before: float | None = None
    perplexity_after: float | None = None

    @property
    def perplexity_change(self) -> float | None:
        """Relative change of perplexity (0.02 = 2% worse)."""
        if self.perplexity_before is None or self.perplexity_after is None:
            return None
        return self.perplexity_after / self.perplexity_before - 1.0

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), perplexity_change=self.perplexity_change,
                    size_ratio=self.size_after / self.size_before if self.size_before else None)


def check_method(method: str) -> None:
    check_choice(method, METHODS, "quantisation method")
    if method in CUDA_ONLY:
        name, library = CUDA_ONLY[method]
        raise LargeForgeError(
            f"--method {method}: {name} needs a CUDA GPU (its calibration and kernels run only "
            f"on CUDA) and no library for it runs on a CPU here; on a CUDA machine use "
            f"{library} on an exported HF directory, or use --method int8 or int4 here"
        )


def read_eval_text(path: str | Path) -> str:
    file = Path(path)
    if not file.is_file():
        raise LargeForgeError(f"--eval-text {file}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LargeForgeError(
            f"--eval-text {file} is not UTF-8 text (byte {exc.start} cannot be decoded)"
        ) from None
    if not text.strip():
        raise LargeForgeError(f"--eval-text {file} is empty")
    return text


def quantization_config(method: str) -> Any:
    from transformers import BitsAndBytesConfig

    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.uint8,
    )


SCHEMES = {
    "int8": "int8 weights per row (LLM.int8), bitsandbytes",
    "int4": "4-bit NF4 weights in blocks of 64, double-quantised scales, bitsandbytes",
}


def weights_size(directory: str | Path) -> int:
    root = Path(directory)
    return sum(f.stat().st_size for pattern in WEIGHT_PATTERNS for f in root.glob(pattern))


def _device_map() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _perplexity(model: Any, tokenizer: Any, text: str) -> Any:
    from largeforge.evaluation.perplexity import text_perplexity

    return text_perplexity(model, tokenizer, [text])


def quantize(
    model_ref: str | Path,
    output: str | Path,
    *,
    method: str,
    eval_text: str | Path | None = None,
    overwrite: bool = False,
) -> QuantizeReport:
    """Quantise `model_ref` (a LoRA adapter merged first) into the model directory `output`,
    measure perplexity on `eval_text` before and after, and write `quantize_report.json`."""
    from transformers import AutoModelForCausalLM

    from largeforge.runs import resolve_model_dir

    check_method(method)
    text = read_eval_text(eval_text) if eval_text is not None else None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LargeForgeError(
            f"--method {method} needs bitsandbytes (pip install bitsandbytes)"
        ) from None
    target = Path(output)
    resolved = resolve_model_dir(model_ref)
    check_output(target, overwrite=overwrite, source=resolved)
    source = load_source(model_ref)
    if source.tokenizer is None:
        raise LargeForgeError(
            f"{source.reference} has no tokenizer (and neither has its base); the quantised "
            "model directory needs one, so save it into the model directory first"
        )
    before = _perplexity(source.model, source.tokenizer, text) if text is not None else None

    with contextlib.ExitStack() as scratch_dirs:  # removed however this ends
        if source.merged_adapter:  # quantise the merged weights, written once in fp32
            scratch = scratch_dirs.enter_context(temp_dir(target))
            source.model.save_pretrained(str(scratch), safe_serialization=True)
            load_from = str(scratch)
        else:
            load_from = source.reference
        local = Path(load_from).is_dir()
        size_before = weights_size(load_from) if local else sum(
            p.numel() * p.element_size() for p in source.model.parameters()
        )
        del source.model  # only one full-precision copy at a time
        with staged_output(target, overwrite=overwrite) as staging:
            try:
                quantized = AutoModelForCausalLM.from_pretrained(
                    load_from, quantization_config=quantization_config(method),
                    device_map=_device_map(), dtype=torch.float32,
                )
            except (ImportError, RuntimeError, ValueError, OSError) as exc:
                raise LargeForgeError(
                    f"bitsandbytes cannot quantise {source.reference} to {method} here: {exc}"
                ) from None
            quantized.save_pretrained(str(staging))  # before any forward pass (see above)
            del quantized
            save_tokenizer(source.tokenizer, staging)
            report = QuantizeReport(
                method=method, library=f"bitsandbytes {_version('bitsandbytes')}",
                scheme=SCHEMES[method], source=source.reference, output=str(target),
                size_before=size_before, size_after=weights_size(staging),
            )
            if text is not None and before is not None:
                reloaded = AutoModelForCausalLM.from_pretrained(
                    str(staging), device_map=_device_map()
                )
                after = _perplexity(reloaded, source.tokenizer, text)
                report.eval_text = str(eval_text)
                report.eval_tokens = after.tokens
                report.loss_before, report.loss_after = before.loss, after.loss
                report.perplexity_before = before.perplexity
                report.perplexity_after = after.perplexity
            (staging / REPORT_FILE).write_text(
                json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8"
            )
    return report


def _version(package: str) -> str:
    from largeforge.hardware import installed_version

    return installed_version(package) or "?"
