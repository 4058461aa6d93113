"""Checking a GGUF file before anything is imported from it, with gguf-py's `GGUFReader`.

`inspect_gguf` reads the header, the metadata and the tensor table (the tensor data stays
memory-mapped and unread) and refuses, as a `LargeForgeError` that names the file:

- a file that is not GGUF, or that ends before its last tensor's data (a truncated download),
  as a `DamagedFileError`;
- an architecture outside `SUPPORTED_ARCHITECTURES`: those `transformers`' GGUF loader turns into
  its own model classes among the decoder-only families LargeForge trains (others, such as
  Mamba or T5, are either not causal LMs or not loadable);
- a file without a tokenizer (`tokenizer.ggml.model` and `tokenizer.ggml.tokens`), or with a
  tokenizer kind `transformers` cannot rebuild (it knows llama.cpp's "llama" SentencePiece and
  "gpt2" byte-level BPE vocabularies).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from largeforge.damaged_files import DamagedFileError, first_line
from largeforge.errors import LargeForgeError

GGUF_MAGIC = b"GGUF"
GGUF_REMEDY = "download or export the GGUF file again"

# llama.cpp architecture names (`general.architecture`) that are imported.
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3",
                           "gpt2")
# llama.cpp tokenizer models (`tokenizer.ggml.model`) that transformers rebuilds.
SUPPORTED_TOKENIZERS = ("gpt2", "llama")
# Token ids that end a turn, by their metadata key (llama.cpp stops at each of them).
END_TOKEN_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                  "tokenizer.ggml.eom_token_id")


@dataclass
class GGUFInfo:
    """What an import needs to know about a GGUF file before loading it."""

    path: Path
    architecture: str
    tokenizer_model: str
    n_parameters: int  # elements of every tensor in the file
    tensor_names: list[str]
    bos_token: str | None
    eos_token: str | None
    end_token_ids: list[int]  # EOS, end-of-turn, end-of-message ids, without repeats
    chat_template: str | None
    head_dim: int | None = None  # as llama.cpp reads it: key_length, else embedding / heads
    context_length: int | None = None

    def has_tensor_suffix(self, suffix: str) -> bool:
        return any(name.endswith(suffix) for name in self.tensor_names)


def is_gguf_file(path: Path) -> bool:
    """A file that starts with GGUF's magic bytes (whatever its name)."""
    try:
        with path.open("rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


def inspect_gguf(path: Path, remedy: str = GGUF_REMEDY) -> GGUFInfo:
    """Read and check `path`; see the module docstring for what is refused. `remedy` says what
    to do about a damaged file."""
    reader = _open(path, remedy)
    fields = reader.fields
    architecture = _field(fields, "general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise LargeForgeError(
            f"{path}: GGUF architecture {architecture!r} cannot be imported; supported "
            f"architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    tokenizer_model = _field(fields, "tokenizer.ggml.model")
    if tokenizer_model is None or "tokenizer.ggml.tokens" not in fields:
        raise LargeForgeError(
            f"{path}: the GGUF file holds no tokenizer (no tokenizer.ggml.model and "
            "tokenizer.ggml.tokens); import a GGUF written with its vocabulary"
        )
    if tokenizer_model not in SUPPORTED_TOKENIZERS:
        raise LargeForgeError(
            f"{path}: GGUF tokenizer {tokenizer_model!r} cannot be rebuilt; supported "
            f"tokenizers: {', '.join(SUPPORTED_TOKENIZERS)}"
        )
    tokens = fields["tokenizer.ggml.tokens"]
    end_ids = [int(fields[key].contents()) for key in END_TOKEN_KEYS if key in fields]
    return GGUFInfo(
        path=path,
        architecture=architecture,
        tokenizer_model=tokenizer_model,
        n_parameters=sum(int(tensor.n_elements) for tensor in reader.tensors),
        tensor_names=[tensor.name for tensor in reader.tensors],
        bos_token=_token(tokens, fields, "tokenizer.ggml.bos_token_id"),
        eos_token=_token(tokens, fields, "tokenizer.ggml.eos_token_id"),
        end_token_ids=list(dict.fromkeys(end_ids)),
        chat_template=_field(fields, "tokenizer.chat_template"),
        head_dim=_head_dim(fields, architecture),
        context_length=_field(fields, f"{architecture}.context_length"),
    )


def _open(path: Path, remedy: str) -> Any:
    """A `GGUFReader` over a complete GGUF file, or a LargeForgeError."""
    import gguf

    if not path.is_file():
        raise LargeForgeError(f"GGUF file {path} not found")
    size = path.stat().st_size
    if not is_gguf_file(path):
        problem = "empty" if size == 0 else "not a GGUF file: it does not start with 'GGUF'"
        raise DamagedFileError(path, problem, remedy)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError, UnicodeDecodeError) as exc:
        raise DamagedFileError(path, f"truncated or garbage: {first_line(exc)}",
                               remedy) from exc
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if not reader.tensors or end > size:
        raise DamagedFileError(
            path, f"truncated: its tensors need {end} bytes, the file has {size}", remedy)
    return reader


def _head_dim(fields: dict[str, Any], arch: str) -> int | None:
    key_length = _field(fields, f"{arch}.attention.key_length")
    if key_length is not None:
        return int(key_length)
    width = _field(fields, f"{arch}.embedding_length")
    heads = _field(fields, f"{arch}.attention.head_count")
    if isinstance(width, int) and isinstance(heads, int) and heads > 0:
        return width // heads
    return None


def _field(fields: dict[str, Any], key: str) -> Any:
    field = fields.get(key)
    return None if field is None else field.contents()


def _token(tokens: Any, fields: dict[str, Any], key: str) -> str | None:
    if key not in fields:
        return None
    index = int(fields[key].contents())
    return str(tokens.contents(index)) if 0 <= index < len(tokens.data) else None
