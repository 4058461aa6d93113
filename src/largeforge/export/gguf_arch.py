"""Model families for GGUF export: which llama.cpp architecture each `transformers` model is,
its hyperparameters under that architecture's keys, and its weights in llama.cpp's layout.

One `Family` per supported model family, read from a table rather than a chain of ifs. What
differs between them, as llama.cpp's own converter and `src/models/*.cpp` expect it:

- llama, mistral: RoPE in llama.cpp's interleaved layout, so Q and K rows are permuted.
- qwen2, qwen3, phi2, phi3, gemma: RoPE in the NeoX (half-split) layout `transformers` uses, so
  weights are written as they are; qwen3 adds per-head RMSNorms on Q and K.
- phi2: LayerNorm with biases, partial rotary (a rope dimension count below the head size),
  attention and MLP in parallel, tanh-GELU, and an output layer with a bias that llama.cpp
  requires even when the embeddings are tied.
- phi3: fused `qkv_proj` and fused `gate_up_proj` (gate rows first), as llama.cpp reads them.
- gemma: RMSNorm weights stored as w + 1 (Gemma normalises with (1 + w)), tanh-GELU, tied
  embeddings only (llama.cpp always reuses the embedding as the output layer), and no
  embedding scale in the file: llama.cpp multiplies the embeddings by sqrt(hidden) itself.
- gpt2: Conv1D weights transposed to (out, in), fused `c_attn`, learned position embeddings,
  LayerNorm with biases and no RoPE.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from largeforge.errors import LargeForgeError

TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


@dataclass(frozen=True)
class Family:
    """How one `transformers` model family is written for one llama.cpp architecture."""

    name: str
    arch: str  # the gguf.MODEL_ARCH member
    norm: str  # "rms" (layer_norm_rms_eps) or "layer" (layer_norm_epsilon)
    rope: str | None  # "interleaved" (Q/K permuted), "neox" (as transformers has it) or None
    activations: tuple[str, ...]
    # How llama.cpp gets the output layer: "optional" (output.weight, or the embedding when
    # the model ties them), "required" (output.weight always) or "embedding" (always the
    # embedding: the model must tie them).
    output: str = "optional"
    norm_offset: float = 0.0  # added to every RMSNorm weight (Gemma's 1 + w)
    transposed: tuple[str, ...] = ()  # Conv1D weights, stored (in, out) by transformers
    checks: tuple[Callable[[Any], str | None], ...] = field(default=())


def _no_sliding_window(config: Any) -> str | None:
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", window is not None) and window is not None \
            and window < config.max_position_embeddings:
        return (f"a sliding window (sliding_window={window} < context "
                f"{config.max_position_embeddings}), which llama.cpp does not apply to it")
    return None


def _no_qk_layernorm(config: Any) -> str | None:
    if getattr(config, "qk_layernorm", False):
        return "qk_layernorm, which llama.cpp's phi2 has no tensors for"
    return None


def _tied(config: Any) -> str | None:
    if not getattr(config, "tie_word_embeddings", True):
        return "an untied output layer; llama.cpp's gemma always reuses the embedding"
    return None


def _plain_gpt2_attention(config: Any) -> str | None:
    if not getattr(config, "scale_attn_weights", True) \
            or getattr(config, "scale_attn_by_inverse_layer_idx", False):
        return "non-standard attention scaling, which llama.cpp's gpt2 does not do"
    return None


def _no_attention_bias(config: Any) -> str | None:
    if getattr(config, "attention_bias", False):
        return "attention biases, which llama.cpp's gemma has no tensors for"
    return None


_LLAMA = dict(arch="LLAMA", norm="rms", rope="interleaved", activations=("silu",))
FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("llama", **_LLAMA),
    "MistralForCausalLM": Family("mistral", **_LLAMA, checks=(_no_sliding_window,)),
    "Qwen2ForCausalLM": Family("qwen2", "QWEN2", "rms", "neox", ("silu",),
                               checks=(_no_sliding_window,)),
    "Qwen3ForCausalLM": Family("qwen3", "QWEN3", "rms", "neox", ("silu",),
                               checks=(_no_sliding_window,)),
    "PhiForCausalLM": Family("phi2", "PHI2", "layer", "neox", TANH_GELU, output="required",
                             checks=(_no_qk_layernorm,)),
    "Phi3ForCausalLM": Family("phi3", "PHI3", "rms", "neox", ("silu",)),
    "GemmaForCausalLM": Family("gemma", "GEMMA", "rms", "neox", TANH_GELU, output="embedding",
                               norm_offset=1.0, checks=(_tied, _no_attention_bias)),
    "GPT2LMHeadModel": Family("gpt2", "GPT2", "layer", None, TANH_GELU,
                              transposed=("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                          "mlp.c_proj"),
                              checks=(_plain_gpt2_attention,)),
}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "phi": "PhiForCausalLM", "phi3": "Phi3ForCausalLM",
               "gemma": "GemmaForCausalLM", "gpt2": "GPT2LMHeadModel"}


def supported_architectures() -> str:
    return ", ".join(f"{hf_name} ({family.name})" for hf_name, family in FAMILIES.items())


def _unsupported(hf_name: str, config: Any, why: str) -> LargeForgeError:
    return LargeForgeError(
        f"GGUF export does not support this {hf_name} (model_type "
        f"{getattr(config, 'model_type', None)!r}): {why}; supported architectures: "
        f"{supported_architectures()}"
    )


def family_of(config: Any) -> Family:
    """The `Family` of a `transformers` config, or a LargeForgeError naming what is supported
    (raised before anything is written)."""
    names = list(getattr(config, "architectures", None) or [])
    model_type = str(getattr(config, "model_type", ""))
    hf_name = names[0] if names else MODEL_TYPES.get(model_type, model_type)
    family = FAMILIES.get(hf_name)
    if family is None:
        raise LargeForgeError(
            f"GGUF export does not support {hf_name} (model_type {model_type!r}); "
            f"supported architectures: {supported_architectures()}"
        )
    act = activation(config)
    if act not in family.activations:
        raise _unsupported(hf_name, config, f"the activation {act!r} (llama.cpp's "
                                            f"{family.name} computes {family.activations[0]})")
    for check in family.checks:
        problem = check(config)
        if problem:
            raise _unsupported(hf_name, config, f"it has {problem}")
    if family.rope is not None:
        rope(config)  # unsupported RoPE scaling is an error before anything is written
    return family


def activation(config: Any) -> str:
    return str(getattr(config, "hidden_act", None)
               or getattr(config, "activation_function", None) or "silu")


def rope(config: Any) -> tuple[float, str, float, float]:
    """(theta, scaling type, factor, partial rotary factor) from transformers 5's
    `rope_parameters` or 4.x fields."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0))
    kind = str(params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
               or "default")
    factor = float(params.get("factor") or scaling.get("factor") or 1.0)
    partial = float(params.get("partial_rotary_factor")
                    or getattr(config, "partial_rotary_factor", None) or 1.0)
    if kind not in ("default", "linear"):
        raise LargeForgeError(
            f"GGUF export supports default and linear RoPE, not rope_type {kind!r}"
        )
    return theta, kind, factor, partial


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None)
               or config.hidden_size // config.num_attention_heads)


def _kv_heads(config: Any) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def _feed_forward(config: Any) -> int:
    size = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    return int(size or 4 * config.hidden_size)


def _norm_eps(config: Any) -> float:
    for key in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"):
        value = getattr(config, key, None)
        if value is not None:
            return float(value)
    raise LargeForgeError(f"GGUF export: no normalisation epsilon in {type(config).__name__}")


def add_hyperparameters(writer: Any, family: Family, config: Any) -> None:
    """The `{arch}.*` keys llama.cpp reads for `family` (general.file_type is the caller's)."""
    import gguf

    dim = head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(_feed_forward(config))
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(_kv_heads(config))
    if family.norm == "rms":
        writer.add_layer_norm_rms_eps(_norm_eps(config))
    else:
        writer.add_layer_norm_eps(_norm_eps(config))
    if dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    if family.rope is not None:
        theta, kind, factor, partial = rope(config)
        writer.add_rope_freq_base(theta)
        writer.add_rope_dimension_count(int(partial * dim))
        if kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(factor)
    writer.add_vocab_size(config.vocab_size)


def permute_for_llama_rope(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a Q or K projection (or bias) from `transformers`' half-split RoPE
    layout to the interleaved one llama.cpp uses for the llama architecture (the inverse of
    the permutation `convert_llama_weights_to_hf.py` applies)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def _skipped(hf_name: str, family: Family, tied: bool) -> bool:
    if hf_name.endswith(("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")):
        return True  # buffers, not weights
    if hf_name == "lm_head.weight":
        return family.output == "embedding" or (family.output == "optional" and tied)
    return False


def _converted(hf_name: str, data: np.ndarray, family: Family, config: Any) -> np.ndarray:
    """One weight in llama.cpp's layout for `family`."""
    if family.rope == "interleaved":
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return permute_for_llama_rope(data, config.num_attention_heads)
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return permute_for_llama_rope(data, _kv_heads(config))
    if family.norm_offset and hf_name.endswith("norm.weight"):
        return data + np.float32(family.norm_offset)
    if data.ndim == 2 and hf_name.endswith(tuple(f"{part}.weight" for part in family.transposed)):
        return data.T
    return data


def model_tensors(model: Any, family: Family) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (gguf name, fp32 array) for every weight of `model`, in llama.cpp's layout."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, family.arch),
                                        config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    embedding: np.ndarray | None = None
    wrote_output = False
    for hf_name, tensor in model.state_dict().items():
        if _skipped(hf_name, family, tied):
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise LargeForgeError(
                f"GGUF export: no llama.cpp tensor for {hf_name!r} in this "
                f"{type(model).__name__}; supported architectures: {supported_architectures()}"
            )
        data = _converted(hf_name, tensor.detach().to("cpu").float().numpy(), family, config)
        data = np.ascontiguousarray(data, dtype=np.float32)
        if gguf_name == "token_embd.weight":
            embedding = data
        wrote_output = wrote_output or gguf_name == "output.weight"
        yield gguf_name, data
    if family.output == "required" and not wrote_output:
        if embedding is None:
            raise LargeForgeError(f"GGUF export: {type(model).__name__} has no embedding")
        yield "output.weight", embedding
