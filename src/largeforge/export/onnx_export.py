"""Export the causal LM to ONNX through `torch.onnx.export(dynamo=True)`.

Two graphs, both with dynamic batch and sequence axes:

- with the KV cache (the default): inputs `input_ids`, `attention_mask` (past + new tokens),
  `position_ids` and `past_key_values.{i}.key/value` [batch, kv_heads, past, head_dim];
  outputs `logits` and `present.{i}.key/value` (the past with the new tokens appended). The
  names are the ones optimum and onnxruntime-genai use. The first call passes a past of
  length 0; each decoding step passes the presents of the previous call back in.
- without it (`kv_cache=False`): `input_ids`, `attention_mask`, `position_ids` -> `logits`.

The legacy TorchScript-based exporter (`dynamo=False`) fails on Llama's `aten::diff`, so only the
dynamo exporter is used. Weights go into the .onnx file itself unless they are too large for one
protobuf message (2 GiB), then into `model.onnx.data` beside it. `export_info.json` records the
inputs, outputs, opset and dtype; the model's config, generation config and tokenizer are
written beside the graph for the program that runs it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from largeforge.errors import LargeForgeError
from largeforge.export.source import check_choice, load_source, write_export_info
from largeforge.inference.generate import cache_keyword, output_cache
from largeforge.staging import check_output, save_tokenizer, staged_output

ONNX_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}
MODEL_FILE = "model.onnx"
MIN_OPSET = 18  # the dynamo exporter writes opset 18 and later
# Protobuf cannot write a message of 2 GiB or more; the graph itself needs some room too.
EXTERNAL_DATA_ABOVE = 2**31 - 2**27


class _LogitsOnly(torch.nn.Module):
    """(input_ids, attention_mask, position_ids) -> logits, no cache."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=False).logits


class _WithCache(torch.nn.Module):
    """The same plus the KV cache as flat tensors: past keys/values in, presents out."""

    def __init__(self, model: Any, num_layers: int) -> None:
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in range(self.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=True,
                         **{cache_keyword(type(self.model)): cache})
        presents: list[torch.Tensor] = []
        for layer in output_cache(out).layers[: self.num_layers]:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def check_opset(opset: int | None) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset is not None and not MIN_OPSET <= opset <= newest:
        raise LargeForgeError(
            f"opset {opset} is not supported: the exporter writes opset {MIN_OPSET} to {newest}"
        )


def cache_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return past, present


def _example_past(model: Any, batch: int, length: int) -> list[torch.Tensor]:
    """Past keys/values of the model's own shapes (run once on `length` tokens)."""
    ids = torch.zeros(batch, length, dtype=torch.long)
    with torch.no_grad():
        cache = output_cache(model(input_ids=ids, use_cache=True))
    tensors: list[torch.Tensor] = []
    for layer in cache.layers:
        tensors += [layer.keys.clone(), layer.values.clone()]
    return tensors


def _export(model: Any, path: Path, *, kv_cache: bool, opset: int | None,
            external: bool) -> None:
    # Example sizes are all different and above 1, so the exporter cannot mistake one dynamic
    # axis for another or specialise on a size of 0 or 1.
    batch, seq, past_len = 2, 3, 5
    ids = torch.zeros(batch, seq, dtype=torch.long)
    batch_dim = torch.export.Dim("batch")
    seq_dim = torch.export.Dim("sequence")
    if kv_cache:
        num_layers = model.config.get_text_config().num_hidden_layers
        past = _example_past(model, batch, past_len)
        if len(past) != 2 * num_layers:
            raise LargeForgeError(
                f"the {model.config.model_type} model's cache has {len(past) // 2} layers, "
                f"its config {num_layers}; export it with --no-kv-cache"
            )
        wrapper: torch.nn.Module = _WithCache(model, num_layers)
        past_dim = torch.export.Dim("past_sequence")
        total_dim = torch.export.Dim("total_sequence")
        mask = torch.ones(batch, past_len + seq, dtype=torch.long)
        positions = torch.arange(past_len, past_len + seq).expand(batch, seq)
        args: tuple[Any, ...] = (ids, mask, positions, *past)
        past_names, present_names = cache_names(num_layers)
        dynamic: dict[str, Any] = {
            "input_ids": {0: batch_dim, 1: seq_dim},
            "attention_mask": {0: batch_dim, 1: total_dim},
            "position_ids": {0: batch_dim, 1: seq_dim},
            "past": tuple({0: batch_dim, 2: past_dim} for _ in past),
        }
        input_names = ["input_ids", "attention_mask", "position_ids", *past_names]
        output_names = ["logits", *present_names]
    else:
        wrapper = _LogitsOnly(model)
        mask = torch.ones(batch, seq, dtype=torch.long)
        positions = torch.arange(seq).expand(batch, seq)
        args = (ids, mask, positions)
        dynamic = {name: {0: batch_dim, 1: seq_dim}
                   for name in ("input_ids", "attention_mask", "position_ids")}
        input_names = ["input_ids", "attention_mask", "position_ids"]
        output_names = ["logits"]
    wrapper.eval()
    # The exporter narrates every stage on stdout and warns about tracing details it handles;
    # the CLI says what matters in one line.
    chatter = io.StringIO()
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)  # "torchvision is not installed": no vision ops here
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                wrapper, args, str(path), dynamo=True, dynamic_shapes=dynamic,
                input_names=input_names, output_names=output_names, opset_version=opset,
                external_data=external, verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; all mean "cannot export"
            family = getattr(model.config, "model_type", "this")
            raise LargeForgeError(
                f"torch.onnx could not export the {family} model: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
        finally:
            registry_log.setLevel(level)


def _describe(values: Any) -> list[dict[str, Any]]:
    import onnx

    out = []
    for value in values:
        tensor = value.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        out.append({"name": value.name, "dtype": dtype, "shape": shape})
    return out


def export_onnx(
    model_ref: str | Path,
    output: str | Path,
    *,
    dtype: str = "float32",
    opset: int | None = None,
    kv_cache: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write `model_ref` (a LoRA adapter merged first) as `output/model.onnx` plus
    `export_info.json`, config and tokenizer. Returns the output directory."""
    import onnx

    from largeforge.runs import resolve_model_dir

    check_choice(dtype, tuple(ONNX_DTYPES), "onnx dtype")
    check_opset(opset)
    target = Path(output)
    check_output(target, overwrite=overwrite, source=resolve_model_dir(model_ref))
    source = load_source(model_ref)
    model = source.model.to(ONNX_DTYPES[dtype])
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = weight_bytes >= EXTERNAL_DATA_ABOVE
    with staged_output(target, overwrite=overwrite) as staging:
        _export(model, staging / MODEL_FILE, kv_cache=kv_cache, opset=opset, external=external)
        proto = onnx.load(str(staging / MODEL_FILE), load_external_data=False)
        written_opset = next(
            (o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None
        )
        model.config.save_pretrained(str(staging))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(staging))
        save_tokenizer(source.tokenizer, staging)
        write_export_info(staging, {
            "format": "onnx",
            "file": MODEL_FILE,
            "external_data": (MODEL_FILE + ".data") if external else None,
            "source": source.reference,
            "merged_adapter": source.merged_adapter,
            "model_type": model.config.model_type,
            "dtype": dtype,
            "opset": written_opset,
            "kv_cache": kv_cache,
            "num_layers": model.config.get_text_config().num_hidden_layers,
            "inputs": _describe(proto.graph.input),
            "outputs": _describe(proto.graph.output),
        })
    return target
