"""A checked GGUF file (plus what an Ollama manifest adds) written as a Hugging Face directory.

The weights are loaded with `transformers`' GGUF loader (`from_pretrained(..., gguf_file=)`),
which dequantises every tensor to fp32 (gguf-py's dequantisers, so a Q4 file becomes the fp32
values llama.cpp's blocks stand for). Such a model refuses `save_pretrained` (its config carries
a GGUF `quantization_config`), so the model is built again from the config without it and the
loaded weights are put into it; the result is saved as safetensors in the requested dtype.

The loader silently skips GGUF tensors its model has no place for, which would give a model
whose logits differ from llama.cpp's. Attention and MLP biases of Llama-family files are given
a place (`attention_bias`, `mlp_bias`); any other skipped tensor (for example Llama 3's
`rope_freqs`, which transformers does not read) is an error: the import compares the number of
weights in the file with the number in the model.

Measured against llama.cpp (llama-cpp-python, F32 KV cache, one thread) on the same file
(tests/test_import_gguf.py): F32 files of tiny random llama, qwen2, qwen3 and phi3 models agree
to 1.2e-6 (asserted < 1e-4), GPT-2 to 7.5e-4 (asserted < 2e-3; llama.cpp approximates GELU).
SmolLM2-135M-Instruct's Q4_1 file agrees to 6.7e-5 with llama.cpp's own F32 dequantisation of
that file (asserted < 1e-3), and to 1.21 (logits' std about 6; asserted < 2.0, the top token
the same at >= 80% of positions) with llama.cpp running the Q4_1 file itself, which rounds the
activations to 8 bits for its quantised matrix products where the fp32 model does not.

Written besides the weights: the tokenizer (rebuilt by `transformers` from the GGUF's
vocabulary) with the chat template (see `templates`), `generation_config.json`,
`import_info.json` (the source, its digest, the template's origin and Ollama's parameters as
they were), `SYSTEM_PROMPT.txt` with Ollama's system prompt when there is one (the file name
Mistral's Hugging Face repositories use for a default system prompt), and `LICENSE` with
Ollama's license text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from largeforge.errors import LargeForgeError
from largeforge.sources.gguf_file import GGUFInfo
from largeforge.sources.ollama_store import OllamaModel

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INFO_FILE = "import_info.json"
SYSTEM_PROMPT_FILE = "SYSTEM_PROMPT.txt"
LICENSE_FILE = "LICENSE"
LLAMA_FAMILY = ("llama", "mistral")
# Architectures whose config has a `head_dim` that transformers' GGUF loader does not read.
HEAD_DIM_ARCHITECTURES = ("qwen3", "gemma2", "gemma3")


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise LargeForgeError(f"unknown dtype {dtype!r}; expected one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def write_hf_directory(info: GGUFInfo, directory: Path, *, dtype: str = "float32",
                       ollama: OllamaModel | None = None, source: str = "",
                       digest: str = "") -> None:
    """Write the model, tokenizer, chat template and generation config into `directory`
    (which exists and is empty)."""
    torch_dtype = check_dtype(dtype)
    tokenizer, template_origin = load_tokenizer(info, ollama)
    model = load_model(info, torch_dtype)
    model.generation_config = _generation_config(info, ollama, tokenizer)
    model.save_pretrained(str(directory))
    from largeforge.staging import save_tokenizer

    save_tokenizer(tokenizer, directory)
    _drop_tokens_past(directory, int(model.config.vocab_size))
    _write_extras(info, directory, ollama=ollama, source=source, digest=digest, dtype=dtype,
                  template_origin=template_origin)


def _drop_tokens_past(directory: Path, vocab_size: int) -> None:
    """Remove tokens the model has no row for from the saved tokenizer. `transformers` builds a
    byte-level GGUF vocabulary as a GPT-2 tokenizer, whose default special token
    `<|endoftext|>` is appended when the file has no such token: one id past the model's
    embedding, which fine-tuning rightly refuses."""
    tokenizer_file = directory / "tokenizer.json"
    spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    dropped = {t["content"] for t in spec.get("added_tokens", []) if t["id"] >= vocab_size}
    if not dropped:
        return
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < vocab_size]
    tokenizer_file.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    decoder = config.get("added_tokens_decoder") or {}
    config["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) < vocab_size}
    for key in ("unk_token", "bos_token", "eos_token", "pad_token"):
        if config.get(key) in dropped:
            config[key] = None
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens")
    if isinstance(extra, list):
        name = ("additional_special_tokens" if "additional_special_tokens" in config
                else "extra_special_tokens")
        config[name] = [t for t in extra if t not in dropped]
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def load_model(info: GGUFInfo, dtype: torch.dtype) -> Any:
    """The GGUF's weights in a plain (saveable) transformers model of `dtype`, in eval mode."""
    from transformers import AutoModelForCausalLM

    overrides = config_overrides(info)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            str(info.path.parent), gguf_file=info.path.name, dtype=torch.float32, **overrides
        )
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as exc:
        raise LargeForgeError(f"{info.path}: transformers cannot load this GGUF ({exc})") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(loaded).__name__]
    state = loaded.state_dict()
    del loaded
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(model.all_tied_weights_keys) if hasattr(model, "all_tied_weights_keys") else set()
    if unexpected or set(missing) - tied:
        raise LargeForgeError(
            f"{info.path}: the GGUF's weights do not fit the {type(model).__name__} built from "
            f"its metadata (missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model.tie_weights()
    _check_every_tensor_used(info, model)
    return model.eval()


def config_overrides(info: GGUFInfo) -> dict[str, Any]:
    """Config values transformers' GGUF loader leaves at their defaults though the file has
    them: Llama biases, `head_dim` where it is not hidden / heads, GPT-2's position count."""
    overrides: dict[str, Any] = {}
    if info.architecture in LLAMA_FAMILY:
        overrides["attention_bias"] = info.has_tensor_suffix(".attn_q.bias")
        overrides["mlp_bias"] = info.has_tensor_suffix(".ffn_up.bias")
    if info.architecture in HEAD_DIM_ARCHITECTURES and info.head_dim:
        overrides["head_dim"] = int(info.head_dim)
    if info.architecture == "gpt2" and info.context_length:
        overrides["n_positions"] = int(info.context_length)
    return overrides


def _check_every_tensor_used(info: GGUFInfo, model: Any) -> None:
    """The model must hold as many weights as the file: transformers skips what it cannot map."""
    seen: set[int] = set()
    count = 0
    for tensor in model.state_dict().values():
        if tensor.data_ptr() in seen:  # tied weights are stored once in the file
            continue
        seen.add(tensor.data_ptr())
        count += tensor.numel()
    if count != info.n_parameters:
        raise LargeForgeError(
            f"{info.path}: the file holds {info.n_parameters:,} weights but the "
            f"{type(model).__name__} transformers builds from it only {count:,}; transformers' "
            "GGUF loader skips some of its tensors (such as rope_freqs), so the model would "
            "not compute what llama.cpp computes"
        )


def load_tokenizer(info: GGUFInfo, ollama: OllamaModel | None) -> tuple[Any, str]:
    """The GGUF's tokenizer, with the chat template chosen as `templates` describes, and where
    that template came from."""
    from transformers import AutoTokenizer

    from largeforge.sources.templates import chat_template_for

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(info.path.parent), gguf_file=info.path.name)
    except (ValueError, KeyError, TypeError) as exc:
        raise LargeForgeError(
            f"{info.path}: transformers cannot rebuild the GGUF's tokenizer ({exc})"
        ) from exc
    template, origin = chat_template_for(
        ollama.template if ollama else None, info.chat_template, info.bos_token, info.eos_token
    )
    tokenizer.chat_template = template
    return tokenizer, origin


def _generation_config(info: GGUFInfo, ollama: OllamaModel | None, tokenizer: Any) -> Any:
    from transformers import GenerationConfig

    from largeforge.sources.templates import generation_settings

    special = {token: tokenizer.convert_tokens_to_ids(token)
               for token in tokenizer.all_special_tokens}
    special.update({token.content: index
                    for index, token in tokenizer.added_tokens_decoder.items() if token.special})
    settings = generation_settings(ollama.params if ollama else {}, info.end_token_ids, special)
    for name in ("bos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            settings[name] = value
    return GenerationConfig(**settings)


def _write_extras(info: GGUFInfo, directory: Path, *, ollama: OllamaModel | None, source: str,
                  digest: str, dtype: str, template_origin: str) -> None:
    record: dict[str, Any] = {
        "source": source,
        "digest": digest,
        "architecture": info.architecture,
        "dtype": dtype,
        "chat_template": template_origin,
    }
    if ollama is not None:
        record["ollama"] = {
            "model": str(ollama.ref),
            "model_digest": ollama.model_digest,
            "template": ollama.template,
            "system": ollama.system,
            "params": ollama.params,
        }
        if ollama.system:
            (directory / SYSTEM_PROMPT_FILE).write_text(ollama.system, encoding="utf-8")
        if ollama.license:
            (directory / LICENSE_FILE).write_text(ollama.license, encoding="utf-8")
    (directory / INFO_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
