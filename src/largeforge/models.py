"""Llama-style models built through `transformers` from a small, friendly config.

The model itself is `transformers.LlamaForCausalLM` (RMSNorm, RoPE, GQA, SwiGLU): every model
LargeForge writes is a plain Hugging Face model directory. This module maps our `ModelConfig`
and named presets onto `LlamaConfig`, and loads or saves model directories.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from largeforge.damaged_files import (
    HUB_CACHE_REMEDY,
    MODEL_REMEDY,
    check_adapter_files,
    check_model_files,
    check_pickled_weights,
    hub_snapshot,
    read_json_object,
    weights_error,
)
from largeforge.errors import LargeForgeError


class ModelConfig(BaseModel):
    """Shape of a Llama-style model. `hidden_dim` is the SwiGLU inner size."""

    model_config = ConfigDict(extra="forbid")

    dim: int = Field(288, gt=0)
    n_layers: int = Field(6, gt=0)
    n_heads: int = Field(6, gt=0)
    n_kv_heads: int | None = Field(None, gt=0, description="defaults to n_heads (no GQA)")
    hidden_dim: int | None = Field(None, gt=0, description="defaults to ~8/3 dim, multiple of 32")
    vocab_size: int = Field(32000, gt=0)
    max_seq_len: int = Field(256, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    tie_embeddings: bool = True
    norm_eps: float = Field(1e-5, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        kv = self.kv_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({kv})")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.hidden_dim:
            return self.hidden_dim
        # llama2.c / Meta rule: 2/3 of 4*dim, rounded up to a multiple of 32.
        hidden = int(2 * 4 * self.dim / 3)
        return 32 * ((hidden + 31) // 32)

    @property
    def parameter_count(self) -> int:
        """Parameters of the model this config builds, known before building it."""
        head_dim = self.dim // self.n_heads
        attention = 2 * self.dim * self.dim + 2 * self.dim * head_dim * self.kv_heads
        layer = attention + 3 * self.dim * self.ffn_dim + 2 * self.dim  # + two RMSNorms
        embeddings = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return embeddings + self.n_layers * layer + self.dim  # + the final norm

    def to_hf(self, **extra: Any) -> LlamaConfig:
        """The equivalent `transformers.LlamaConfig`."""
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.dim,
            intermediate_size=self.ffn_dim,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.max_seq_len,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.norm_eps,
            tie_word_embeddings=self.tie_embeddings,
            attention_dropout=self.dropout,
            hidden_act="silu",
            **extra,
        )


# Presets. `small` is the llama2.c "stories15M" shape; medium and base follow stories42M and
# stories110M. All tie input and output embeddings, as llama2.c does.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=352, vocab_size=4096,
        max_seq_len=256,
    ),
    "small": ModelConfig(dim=288, n_layers=6, n_heads=6, hidden_dim=768, max_seq_len=256),
    "medium": ModelConfig(dim=512, n_layers=8, n_heads=8, hidden_dim=1376, max_seq_len=1024),
    "base": ModelConfig(dim=768, n_layers=12, n_heads=12, hidden_dim=2048, max_seq_len=1024),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name].model_copy()
    except KeyError:
        names = ", ".join(PRESETS)
        raise LargeForgeError(f"unknown model preset {name!r}; expected one of: {names}") from None


def build_model(config: ModelConfig, **hf_extra: Any) -> LlamaForCausalLM:
    """A freshly initialised `LlamaForCausalLM` with SDPA attention, in fp32."""
    hf_config = config.to_hf(**hf_extra)
    return LlamaForCausalLM._from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32)


def _numel(p: torch.Tensor) -> int:
    """Elements of the weight a parameter stands for: a 4-bit bitsandbytes weight packs two
    into each byte and keeps its real shape in its quantisation state."""
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return int(torch.Size(quant_state.shape).numel())
    return p.numel()


def _unique_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    seen: set[int] = set()
    unique = []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total, trainable and embedding-table parameter counts (shared tensors counted once);
    works on PEFT-wrapped and 4-bit models too."""
    params = _unique_parameters(model)
    total = sum(_numel(p) for p in params)
    trainable = sum(_numel(p) for p in params if p.requires_grad)
    embedding = 0
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_embeddings) and get_embeddings() is not None:
        embedding = get_embeddings().weight.numel()
    return {"total": total, "trainable": trainable, "embedding": embedding}


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: per matmul parameter 2 forward + 2 for the input gradient + 2 for
    its own gradient when it is trained (so 6N for full training, about 4N on a frozen LoRA
    base), plus attention (PaLM appendix B).

    The input embedding is a lookup, not a matmul, so it is left out unless it is tied to the
    output head (which is a matmul over the whole vocabulary).
    """
    cfg = model.config
    emb = model.get_input_embeddings().weight  # type: ignore[operator]
    out = model.get_output_embeddings()  # type: ignore[operator]
    flops = 0.0
    for p in _unique_parameters(model):
        if p is emb and (out is None or out.weight is not emb):
            continue
        flops += (6.0 if p.requires_grad else 4.0) * _numel(p)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * seq_len
    return flops + attention


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a causal LM from a model directory, a run directory (its final/, best/ or latest
    checkpoint), a PEFT adapter directory (its base with the adapter merged in) or a hub id
    (from the local Hugging Face cache, or downloaded when online). A damaged file is a
    `DamagedFileError` that names it."""
    from largeforge.adapters import is_adapter_dir
    from largeforge.runs import resolve_model_dir

    ref = resolve_model_dir(path)
    local = Path(ref)
    if is_adapter_dir(local):
        return load_adapted_model(local, dtype=dtype)
    if local.is_dir():
        return _load_local_model(local, dtype)
    return _load_hub_model(ref, dtype)


def _load_local_model(local: Path, dtype: torch.dtype) -> PreTrainedModel:
    if not any(next(local.glob(p), None) for p in WEIGHT_FILES):
        raise LargeForgeError(
            f"model directory {local} has no weights (model.safetensors or pytorch_model.bin); "
            "point at a complete model directory"
        )
    check_model_files(local)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            local, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True)
    except OSError as exc:
        raise LargeForgeError(f"cannot load a model from {local}: {exc}") from exc
    except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError):
        check_pickled_weights(local)  # a truncated or garbage .bin is named
        raise
    _check_every_weight_loaded(local, info)
    return model


def _check_every_weight_loaded(local: Path, info: dict[str, Any]) -> None:
    """Weights that lack tensors of the model, or hold them in other shapes, are damaged
    (transformers would start those tensors from random values)."""
    if info.get("missing_keys"):
        raise weights_error(local, info["missing_keys"], "the model needs are missing")
    mismatched = info.get("mismatched_keys") or ()
    if mismatched:
        names = [str(m[0] if isinstance(m, tuple) else m) for m in mismatched]
        raise weights_error(local, names, "have another shape than config.json gives")


def _load_hub_model(ref: str, dtype: torch.dtype) -> PreTrainedModel:
    from largeforge.runs import not_cached_error

    snapshot = hub_snapshot(ref)
    if snapshot is not None:
        check_model_files(snapshot, HUB_CACHE_REMEDY)
    try:  # the local cache first, so no network is touched when it is there
        return AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, local_files_only=True)
    except OSError:
        pass
    missing = not_cached_error(ref)
    if _offline():
        raise missing
    try:
        return AutoModelForCausalLM.from_pretrained(ref, dtype=dtype)
    except OSError:
        raise missing from None


def load_adapted_model(adapter_dir: str | Path, dtype: torch.dtype = torch.float32,
                       base: str | Path | None = None) -> Any:
    """Base + adapter as one plain transformers model (the adapter merged in), for inference."""
    from largeforge.adapters import adapter_base, load_adapter

    check_adapter_files(adapter_dir)  # before the (slow) base is loaded
    base_ref = base or adapter_base(adapter_dir)
    if not base_ref:
        raise LargeForgeError(f"the adapter in {adapter_dir} does not name its base model")
    if Path(str(base_ref)).resolve() == Path(adapter_dir).resolve():
        raise LargeForgeError(f"the adapter in {adapter_dir} names itself as its base model")
    model = load_model(base_ref, dtype=dtype)
    try:
        return load_adapter(model, adapter_dir).merge_and_unload()
    except (ValueError, KeyError, RuntimeError) as exc:
        raise LargeForgeError(
            f"the adapter in {adapter_dir} does not fit the base model {base_ref}: {exc}"
        ) from None


def _offline() -> bool:
    return any(
        os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def model_config_from_hf(path: str | Path) -> dict[str, Any]:
    """The raw `config.json` of a model directory."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise LargeForgeError(f"{path} is not a model directory: it has no config.json")
    return read_json_object(config_file, MODEL_REMEDY)
