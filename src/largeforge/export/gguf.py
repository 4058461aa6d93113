"""Export to GGUF, the file format of llama.cpp (and of Ollama, LM Studio, llamafile...).

The file is written with the `gguf` package that ships with llama.cpp, the way llama.cpp's own
`convert_hf_to_gguf.py` writes it: tensor names from `gguf.TensorNameMap`, hyperparameters under
the architecture's keys, and the tokenizer as llama.cpp's "gpt2" (byte-level BPE) model with its
tokens, token types, merges, special token ids, `add_bos_token` and the chat template.

Supported: Llama (and Mistral without a sliding window, which llama.cpp runs as Llama) and
Qwen2, in F32, F16, Q8_0 and Q4_0 (the 4-bit type `gguf.quants` can quantise in numpy; its
K-quants have no quantiser there). Llama's Q and K projections are permuted into the
interleaved RoPE layout llama.cpp uses for Llama; Qwen2 uses the NeoX layout, as `transformers`
does, and is written as it is (with its q/k/v biases).

The tokenizer must be a byte-level BPE whose pre-tokenizer regex llama.cpp knows by name (the
GPT-2 regex, as LargeForge's own tokenizers use, or Qwen2's or Llama 3's); anything else is an
error that says what is supported, since a GGUF that tokenises differently would be wrong in
silence.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from largeforge.errors import LargeForgeError

DTYPES = ("f32", "f16", "q8_0", "q4_0")

# Hugging Face architecture -> llama.cpp architecture name.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}

# Pre-tokenizer regexes llama.cpp knows, by the name `tokenizer.ggml.pre` gives them, with the
# `ignore_merges` setting llama.cpp assumes for each.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
SPLIT_REGEXES: dict[str, tuple[str, bool]] = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": ("qwen2", False),
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": ("llama-bpe", True),
    GPT2_REGEX: ("gpt-2", False),
}


def supported_architectures() -> str:
    return ", ".join(ARCHITECTURES)


@dataclass
class Vocab:
    """The tokenizer as llama.cpp's "gpt2" model stores it."""

    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)
    chat_template: str | None = None


def export_gguf(
    model_ref: str | Path,
    output: Path,
    *,
    dtype: str = "f16",
    add_bos: bool | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write the model `model_ref` (model dir, run dir, LoRA adapter dir or hub id; adapters
    are merged) to the GGUF file `output`, atomically, and return its path.

    `dtype` is f32, f16, q8_0 or q4_0 (1-D tensors always stay F32). `add_bos` sets
    `tokenizer.ggml.add_bos_token`; None does what `largeforge generate` does (BOS in front of
    every prompt when the tokenizer has one). `chat_template` replaces the tokenizer's own in the
    file's metadata.
    """
    check_dtype(dtype)
    output = check_output_file(Path(output))
    model, tokenizer = load_fp32(model_ref)
    return write_gguf(model, tokenizer, output, dtype=dtype, add_bos=add_bos,
                      chat_template=chat_template)


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
) -> Path:
    """Write a loaded (fp32) model and its tokenizer to `output` as GGUF; see `export_gguf`."""
    import gguf

    check_dtype(dtype)
    output = check_output_file(Path(output))
    arch = architecture(model.config)
    vocab = read_vocab(tokenizer, model.config.vocab_size)
    if chat_template is not None:
        vocab.chat_template = chat_template
    if add_bos is None:
        add_bos = tokenizer.bos_token_id is not None  # as `encode_prompt` does
    tensors = list(convert_tensors(model, arch, dtype))  # every check passes before any write

    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # No `general.name`: llama.cpp changes how it tokenises by the model's name (a name
        # holding "phi-3" gets Phi-3's special-token rules, and fails without its tokens), so
        # a directory name must not decide that.
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        _add_hyperparameters(writer, model.config, dtype)
        _add_vocab(writer, vocab, add_bos, _eos_id(model, tokenizer))
        for tensor_name, data, qtype in tensors:
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return output


# --- architecture and tensors -------------------------------------------------------------


def architecture(config: Any) -> Any:
    """The `gguf.MODEL_ARCH` for a `transformers` config, or a LargeForgeError naming what is
    supported."""
    import gguf

    names = list(getattr(config, "architectures", None) or [])
    if not names:
        by_type = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                   "qwen2": "Qwen2ForCausalLM"}
        names = [by_type.get(getattr(config, "model_type", ""), str(config.model_type))]
    hf_name = names[0]
    if hf_name not in ARCHITECTURES:
        raise LargeForgeError(
            f"GGUF export does not support {hf_name} (model_type {config.model_type!r}); "
            f"supported architectures: {supported_architectures()}"
        )
    if hf_name == "MistralForCausalLM":
        window = getattr(config, "sliding_window", None)
        if window is not None and window < config.max_position_embeddings:
            raise LargeForgeError(
                f"GGUF export supports Mistral only without a sliding window (this one has "
                f"sliding_window={window} < context {config.max_position_embeddings}); "
                f"supported architectures: {supported_architectures()}"
            )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise LargeForgeError(
            f"GGUF export expects the SwiGLU (silu) MLP of {hf_name}, got hidden_act="
            f"{config.hidden_act!r}"
        )
    _rope(config)  # unsupported RoPE scaling is an error before anything is written
    return gguf.MODEL_ARCH.QWEN2 if ARCHITECTURES[hf_name] == "qwen2" else gguf.MODEL_ARCH.LLAMA


def _rope(config: Any) -> tuple[float, str, float]:
    """(theta, scaling type, factor) from transformers 5's `rope_parameters` or 4.x fields."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0))
    kind = str(params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
               or "default")
    factor = float(params.get("factor") or scaling.get("factor") or 1.0)
    if kind not in ("default", "linear"):
        raise LargeForgeError(
            f"GGUF export supports default and linear RoPE, not rope_type {kind!r}"
        )
    return theta, kind, factor


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None)
               or config.hidden_size // config.num_attention_heads)


def permute_for_llama_rope(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a Q or K projection (or bias) from `transformers`' half-split RoPE
    layout to the interleaved one llama.cpp uses for the llama architecture (the inverse of
    the permutation `convert_llama_weights_to_hf.py` applies)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


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


def convert_tensors(model: Any, arch: Any, dtype: str) -> Any:
    """Yield (gguf name, data, GGML type) for every weight, converted and quantised."""
    import gguf
    from gguf import GGMLQuantizationType

    config = model.config
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise LargeForgeError(
                f"GGUF export: no llama.cpp tensor for {hf_name!r} in this "
                f"{type(model).__name__}; supported architectures: {supported_architectures()}"
            )
        data = tensor.detach().to("cpu").float().numpy()
        if arch == gguf.MODEL_ARCH.LLAMA:
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                data = permute_for_llama_rope(data, n_head)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute_for_llama_rope(data, n_kv)
        qtype = tensor_type(gguf_name, data, dtype)
        if qtype == GGMLQuantizationType.F32:
            yield gguf_name, np.ascontiguousarray(data, dtype=np.float32), qtype
        elif qtype == GGMLQuantizationType.F16:
            yield gguf_name, data.astype(np.float16), qtype
        else:
            yield gguf_name, gguf.quants.quantize(data, qtype), qtype


def _file_type(dtype: str) -> Any:
    from gguf import LlamaFileType

    return {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
            "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0}[dtype]


def _add_hyperparameters(writer: Any, config: Any, dtype: str) -> None:
    import gguf

    head_dim = _head_dim(config)
    theta, rope_kind, factor = _rope(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None)
                             or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope_kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_file_type(dtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# --- tokenizer ----------------------------------------------------------------------------


def _unsupported_tokenizer(why: str) -> LargeForgeError:
    return LargeForgeError(
        f"GGUF export supports byte-level BPE tokenizers (as `largeforge tokenizer train` "
        f"writes, GPT-2's, Qwen2's or Llama 3's); this tokenizer {why}"
    )


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> tuple[str, bool]:
    """llama.cpp's name for a `tokenizers` pre-tokenizer (and the ignore_merges it implies)."""
    if pre is None:
        raise _unsupported_tokenizer("has no pre-tokenizer")
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise _unsupported_tokenizer("adds a prefix space (ByteLevel add_prefix_space)")
        if not pre.get("use_regex", True):
            raise _unsupported_tokenizer("has a ByteLevel pre-tokenizer without its regex")
        return SPLIT_REGEXES[GPT2_REGEX]
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if parts and len(parts) == 2 and parts[0].get("type") == "Split" \
            and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True) \
            and not parts[1].get("add_prefix_space"):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex in SPLIT_REGEXES and parts[0].get("behavior") == "Isolated" \
                and not parts[0].get("invert"):
            return SPLIT_REGEXES[regex]
        raise _unsupported_tokenizer(f"splits with a regex llama.cpp does not know: {regex!r}")
    raise _unsupported_tokenizer(f"has the pre-tokenizer {json.dumps(pre)[:200]}")


def read_vocab(tokenizer: Any, vocab_size: int) -> Vocab:
    """Tokens, types, merges, special ids and chat template of a fast byte-level BPE
    tokenizer, padded to the model's `vocab_size` with unused tokens."""
    from gguf import TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise _unsupported_tokenizer("is not a fast (`tokenizers`) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise _unsupported_tokenizer(f"is a {model.get('type')} model, not BPE")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        raise _unsupported_tokenizer("uses byte fallback or subword prefixes/suffixes")
    normalizer = spec.get("normalizer")
    # NFC (as Qwen2's tokenizer has) is left out, as llama.cpp's converter does: it changes
    # only text that is not already NFC, which is rare in practice.
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise _unsupported_tokenizer(f"has a normalizer ({normalizer.get('type')})")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise _unsupported_tokenizer("does not decode as byte-level")
    pre, ignore_merges = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if bool(model.get("ignore_merges", False)) != ignore_merges:
        raise _unsupported_tokenizer(
            f"sets ignore_merges={model.get('ignore_merges')} where llama.cpp's {pre!r} "
            f"pre-tokenizer assumes {ignore_merges}"
        )

    size = len(tokenizer)
    if size > vocab_size:
        raise LargeForgeError(
            f"the tokenizer has {size} tokens but the model's vocabulary is {vocab_size}"
        )
    added = {t["id"]: bool(t.get("special")) for t in spec.get("added_tokens", [])}
    tokens = [str(t) for t in tokenizer.convert_ids_to_tokens(list(range(size)))]
    types = [
        int(TokenType.CONTROL if added[i] else TokenType.USER_DEFINED) if i in added
        else int(TokenType.NORMAL)
        for i in range(size)
    ]
    for i in range(size, vocab_size):  # model rows past the tokenizer: never produced
        tokens.append(f"[PAD{i}]")
        types.append(int(TokenType.UNUSED))

    merges = []
    for merge in model.get("merges") or []:
        pair = merge.split(" ", 1) if isinstance(merge, str) else merge
        # llama.cpp splits merges at the space, so a space inside a part is written as U+0120
        # (what `gguf.SpecialVocab` does too); byte-level parts never hold one in practice.
        merges.append(" ".join(part.replace(" ", "\u0120") for part in pair))

    special_ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            special_ids[kind] = int(token_id)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return Vocab(pre=pre, tokens=tokens, types=types, merges=merges, special_ids=special_ids,
                 chat_template=template or None)


def _eos_id(model: Any, tokenizer: Any) -> int | None:
    """The EOS generation stops at: the generation config's first, else the tokenizer's."""
    value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if value is None:
        value = tokenizer.eos_token_id
    return None if value is None else int(value)


def _add_vocab(writer: Any, vocab: Vocab, add_bos: bool, eos_id: int | None) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    # llama.cpp refuses a "gpt2" vocabulary without a merges key, and gguf-py writes no empty
    # array: a tokenizer without merges (one token per byte) gets one merge that can never
    # apply, since no symbol longer than one character ever forms without merges.
    writer.add_token_merges(vocab.merges or [NEVER_MERGE])
    ids = dict(vocab.special_ids)
    if eos_id is not None:
        ids["eos"] = eos_id
    for kind, token_id in ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    eot = _end_of_turn_id(vocab)
    if eot is not None:
        writer.add_eot_token_id(eot)
    writer.add_add_bos_token(bool(add_bos))
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


NEVER_MERGE = "\u0120\u0120 \u0120\u0120"

# End-of-turn markers of the template families we know (ChatML, Llama 3, Phi-3, Gemma).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def _end_of_turn_id(vocab: Vocab) -> int | None:
    """The id of the chat template's end-of-turn marker when it is one control token."""
    if not vocab.chat_template:
        return None
    from gguf import TokenType

    for marker in END_OF_TURN_TOKENS:
        if marker in vocab.chat_template and marker in vocab.tokens:
            token_id = vocab.tokens.index(marker)
            if vocab.types[token_id] == int(TokenType.CONTROL):
                return token_id
    return None
