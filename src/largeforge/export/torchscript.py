"""Export the causal LM as a TorchScript module: `input_ids [batch, seq] -> logits`.

Traced with `torch.jit.trace` (scripting a transformers model fails on its Python-level code).
A trace records one path through the model; the few shape tests it freezes (is the query longer
than one token, does the batch match) lead to the same result at other shapes for a causal LM
without padding, and the export checks that: the traced module must give the eager model's
logits at a batch and length other than the tracing example, or nothing is written.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from largeforge.errors import LargeForgeError
from largeforge.export.source import check_choice, load_source, write_export_info
from largeforge.staging import check_output, save_tokenizer, staged_output

TORCHSCRIPT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
MODEL_FILE = "model.pt"
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class _Logits(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def trace_logits(model: Any) -> torch.jit.ScriptModule:
    """The traced `input_ids -> logits` module of `model`, checked at a second shape."""
    wrapper = _Logits(model).eval()
    vocab = int(model.config.get_text_config().vocab_size)
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(0, vocab, (2, 8), generator=generator)
    check = torch.randint(0, vocab, (3, 13), generator=generator)
    with warnings.catch_warnings(), torch.no_grad():
        # TracerWarnings name the shape tests the trace freezes; the check below is the answer.
        warnings.simplefilter("ignore")
        try:
            traced = torch.jit.trace(wrapper, example, check_trace=False)
        except Exception as exc:  # tracing raises many types; all mean "cannot export"
            raise LargeForgeError(
                f"torch.jit.trace could not trace the {model.config.model_type} model: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        want = wrapper(check)
        got = traced(check)
    dtype = next(model.parameters()).dtype
    diff = float((want.float() - got.float()).abs().max())
    if diff > CHECK_TOLERANCE.get(dtype, 1e-4) * max(1.0, float(want.float().abs().max())):
        raise LargeForgeError(
            f"the traced {model.config.model_type} model does not generalise to other shapes "
            f"(max logit difference {diff:.3g}); it cannot be exported to TorchScript"
        )
    return traced


def export_torchscript(
    model_ref: str | Path,
    output: str | Path,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write `model_ref` (a LoRA adapter merged first) as `output/model.pt` (load it with
    `torch.jit.load`), with `export_info.json` and the tokenizer. Returns the directory."""
    from largeforge.runs import resolve_model_dir

    check_choice(dtype, tuple(TORCHSCRIPT_DTYPES), "torchscript dtype")
    target = Path(output)
    check_output(target, overwrite=overwrite, source=resolve_model_dir(model_ref))
    source = load_source(model_ref)
    model = source.model.to(TORCHSCRIPT_DTYPES[dtype])
    traced = trace_logits(model)
    vocab = int(model.config.get_text_config().vocab_size)
    with staged_output(target, overwrite=overwrite) as staging:
        traced.save(str(staging / MODEL_FILE))
        save_tokenizer(source.tokenizer, staging)
        write_export_info(staging, {
            "format": "torchscript",
            "file": MODEL_FILE,
            "source": source.reference,
            "merged_adapter": source.merged_adapter,
            "model_type": model.config.model_type,
            "dtype": dtype,
            "torch": torch.__version__,
            "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}],
            "outputs": [{"name": "logits", "dtype": dtype,
                         "shape": ["batch", "sequence", vocab]}],
        })
    return target
