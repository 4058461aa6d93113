"""Export to GGUF, the file format of llama.cpp (and of Ollama, LM Studio, llamafile...).

The file is written with the `gguf` package that ships with llama.cpp, the way llama.cpp's own
`convert_hf_to_gguf.py` writes it: tensor names from `gguf.TensorNameMap`, hyperparameters under
the architecture's keys, and the tokenizer with its tokens, token types, merges or scores,
special token ids, `add_bos_token` and the chat template.

Supported families (`gguf_arch.FAMILIES`): Llama, Mistral without a sliding window (which
llama.cpp runs as Llama), Qwen2, Qwen3, Phi-2, Phi-3, Gemma and GPT-2, each with the layout
llama.cpp expects (see `gguf_arch`). F32 and F16 are written here; the quantised types (Q8_0,
Q4_0 and the K-quants Q4_K_M, Q5_K_M, Q6_K) are written as F16 and then quantised by llama.cpp's
own quantizer, with the perplexity they cost measured beside them (`gguf_quantize`). Without
llama-cpp-python, Q8_0 and Q4_0 fall back to `gguf.quants`' numpy quantiser (no report).

Supported tokenizers (`gguf_vocab`): byte-level BPE with a pre-tokenizer llama.cpp knows by
name (GPT-2's regex, as LargeForge's own tokenizers use, Llama 3's, Qwen2's or SmolLM's), and
SentencePiece-style BPE with byte fallback (Llama 2, TinyLlama, Mistral v0.1). Anything else is
an error that says what is supported, since a GGUF that tokenises differently would be wrong in
silence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from largeforge.atomic_files import replace_path, temp_dir, temp_file
from largeforge.errors import LargeForgeError
from largeforge.export.gguf_arch import (
    Family,
    add_hyperparameters,
    family_of,
    model_tensors,
    permute_for_llama_rope,
    supported_architectures,
)
from largeforge.export.gguf_quantize import (
    K_QUANTS,
    PPL_CONTEXT,
    needs_llama_cpp,
    quantization_report,
    quantize_file,
    report_path,
    require_llama_cpp,
    write_report,
)
from largeforge.export.gguf_vocab import Vocab, add_vocab, read_vocab

__all__ = ["DTYPES", "Vocab", "check_dtype", "export_gguf", "load_fp32",
           "permute_for_llama_rope", "read_vocab", "supported_architectures", "write_gguf"]

DTYPES = ("f32", "f16", "q8_0", "q4_0", *K_QUANTS)


def export_gguf(
    model_ref: str | Path,
    output: Path,
    *,
    dtype: str = "f16",
    add_bos: bool | None = None,
    chat_template: str | None = None,
    eval_text: str | None = None,
) -> Path:
    """Write the model `model_ref` (model dir, run dir, LoRA adapter dir or hub id; adapters
    are merged) to the GGUF file `output`, atomically, and return its path.

    `dtype` is one of `DTYPES` (1-D tensors always stay F32); a quantised type also writes
    `<stem>.perplexity.json` beside the file, measured on `eval_text` (default: the Python
    documentation). `add_bos` sets `tokenizer.ggml.add_bos_token`; None does what `largeforge
    generate` does (BOS in front of every prompt when the tokenizer has one). `chat_template`
    replaces the tokenizer's own in the file's metadata.
    """
    check_dtype(dtype)
    output = check_output_file(Path(output))
    if dtype in K_QUANTS:
        require_llama_cpp(dtype)  # before the (slow) model load
    model, tokenizer = load_fp32(model_ref)
    return write_gguf(model, tokenizer, output, dtype=dtype, add_bos=add_bos,
                      chat_template=chat_template, eval_text=eval_text)


def load_fp32(model_ref: str | Path) -> tuple[Any, Any]:
    """(model in fp32 on the CPU, tokenizer) for any model reference."""
    import torch

    from largeforge.inference.generate import load_for_inference

    model, tokenizer = load_for_inference(model_ref, device="cpu")
    return model.to(torch.float32), tokenizer


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise LargeForgeError(f"unknown GGUF type {dtype!r}; expected one of: {', '.join(DTYPES)}")


def check_output_file(output: Path) -> Path:
    output = output.expanduser()
    if output.is_dir():
        raise LargeForgeError(
            f"GGUF output {output} is a directory; give a file path such as {output}/model.gguf"
        )
    return output


def write_gguf(
    model: Any,
    tokenizer: Any,
    output: Path,
    *,
    dtype: str = "f16",
    add_bos: bool | None = None,
    chat_template: str | None = None,
    eval_text: str | None = None,
) -> Path:
    """Write a loaded (fp32) model and its tokenizer to `output` as GGUF; see `export_gguf`."""
    check_dtype(dtype)
    output = check_output_file(Path(output))
    if needs_llama_cpp(dtype):
        return _write_quantized(model, tokenizer, output, dtype=dtype, add_bos=add_bos,
                                chat_template=chat_template, eval_text=eval_text)
    _write_direct(model, tokenizer, output, dtype=dtype, add_bos=add_bos,
                  chat_template=chat_template)
    report_path(output).unlink(missing_ok=True)  # a report of an earlier export is not this one's
    return output


def _write_quantized(model: Any, tokenizer: Any, output: Path, *, dtype: str,
                     add_bos: bool | None, chat_template: str | None,
                     eval_text: str | None) -> Path:
    """F16 first, then llama.cpp's quantizer, then both measured; all in a staging directory
    beside `output`, renamed into place when complete."""
    with temp_dir(output) as tmp:
        f16 = _write_direct(model, tokenizer, tmp / "f16.gguf", dtype="f16",
                            add_bos=add_bos, chat_template=chat_template)
        quantized = tmp / f"{dtype}.gguf"
        quantize_file(f16, quantized, dtype)
        context = min(PPL_CONTEXT, int(getattr(model.config, "max_position_embeddings", 0)
                                       or PPL_CONTEXT))
        report = quantization_report(f16, quantized, dtype, eval_text, context=context)
        staged_report = write_report(report, tmp / "report.json")
        replace_path(quantized, output)
        replace_path(staged_report, report_path(output))
    return output


def _write_direct(model: Any, tokenizer: Any, output: Path, *, dtype: str,
                  add_bos: bool | None, chat_template: str | None) -> Path:
    """Write the GGUF with gguf-py: F32, F16, or Q8_0/Q4_0 through `gguf.quants`."""
    import gguf

    family = family_of(model.config)
    vocab = read_vocab(tokenizer, model.config.vocab_size)
    if chat_template is not None:
        vocab.chat_template = chat_template
    if add_bos is None:
        add_bos = tokenizer.bos_token_id is not None  # as `encode_prompt` does
    tensors = list(convert_tensors(model, family, dtype))  # every check passes before any write

    with temp_file(output) as tmp:
        # No `general.name`: llama.cpp changes how it tokenises by the model's name (a name
        # holding "phi-3" gets Phi-3's special-token rules, and fails without its tokens), so
        # a directory name must not decide that.
        arch = getattr(gguf.MODEL_ARCH, family.arch)
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        _add_hyperparameters(writer, family, model.config, dtype)
        add_vocab(writer, vocab, add_bos, _eos_id(model, tokenizer))
        for tensor_name, data, qtype in tensors:
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        replace_path(tmp, output)
    return output


# --- architecture and tensors -------------------------------------------------------------


def architecture(config: Any) -> Any:
    """The `gguf.MODEL_ARCH` for a `transformers` config, or a LargeForgeError naming what is
    supported."""
    import gguf

    return getattr(gguf.MODEL_ARCH, family_of(config).arch)


def tensor_type(gguf_name: str, data: np.ndarray, dtype: str) -> Any:
    """The GGML type of one tensor: 1-D tensors (norms, biases) stay F32; with q4_0 the
    embedding and output matrices stay Q8_0 (llama.cpp's quantize keeps the output layer at
    higher precision too, and with tied embeddings the embedding is that layer); a row
    length that is not a whole number of quantisation blocks falls back to F16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if data.ndim == 1 or dtype == "f32":
        return GGMLQuantizationType.F32
    if dtype == "f16":
        return GGMLQuantizationType.F16
    qtype = GGMLQuantizationType.Q8_0
    if dtype == "q4_0" and gguf_name not in ("token_embd.weight", "output.weight"):
        qtype = GGMLQuantizationType.Q4_0
    block_size = GGML_QUANT_SIZES[qtype][0]
    return qtype if data.shape[-1] % block_size == 0 else GGMLQuantizationType.F16


def convert_tensors(model: Any, family: Family, dtype: str) -> Any:
    """Yield (gguf name, data, GGML type) for every weight, converted and quantised."""
    import gguf
    from gguf import GGMLQuantizationType

    for gguf_name, data in model_tensors(model, family):
        qtype = tensor_type(gguf_name, data, dtype)
        if qtype == GGMLQuantizationType.F32:
            yield gguf_name, data, qtype
        elif qtype == GGMLQuantizationType.F16:
            yield gguf_name, data.astype(np.float16), qtype
        else:
            yield gguf_name, gguf.quants.quantize(data, qtype), qtype


def _file_type(dtype: str) -> Any:
    from gguf import LlamaFileType

    return {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
            "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0}[dtype]


def _add_hyperparameters(writer: Any, family: Family, config: Any, dtype: str) -> None:
    import gguf

    add_hyperparameters(writer, family, config)
    writer.add_file_type(_file_type(dtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _eos_id(model: Any, tokenizer: Any) -> int | None:
    """The EOS generation stops at: the generation config's first, else the tokenizer's."""
    value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None:
        value = tokenizer.eos_token_id
    return None if value is None else int(value)
