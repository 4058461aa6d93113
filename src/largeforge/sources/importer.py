"""GGUF files and Ollama models as model sources: `import_model` and the import cache.

A source is a GGUF file (any path ending in `.gguf`, or any file that starts with GGUF's magic
bytes, such as an Ollama blob) or `ollama:NAME[:TAG]` (see `ollama_store`). `import_model`
writes one as a plain Hugging Face directory (`largeforge import`). `resolve_source` is what
`largeforge.runs.resolve_model_dir` calls, so that every command taking `--model` takes a
source too: the source is imported once, in float32, into

    <cache>/models/<key>/        <cache> = $LARGEFORGE_CACHE_DIR, else ~/.cache/largeforge

where `<key>` hashes the GGUF's content (its SHA-256, or for an Ollama model the blob digests
of its model, template, system prompt and parameters, which Ollama's manifest already names by
content) and this importer's format version. Later uses of the same content find the directory
and load nothing again, whatever the file's name or place. An entry is written in a staging
directory beside it and renamed into place when complete, so an interrupted import never
leaves a half directory under the key; the staging directories of processes that are gone are
removed by the next import.

Every check (the file is complete GGUF, an architecture and tokenizer we import, the Ollama
manifest and blobs exist) runs before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from largeforge.atomic_files import honour_umask
from largeforge.errors import LargeForgeError
from largeforge.sources.gguf_file import GGUFInfo, inspect_gguf, is_gguf_file
from largeforge.sources.ollama_store import OllamaModel, is_ollama_ref, read_model

CACHE_FORMAT = 2  # bump when the imported directory's content changes
CACHE_SUBDIR = "models"
STAGING_PREFIX = ".staging-"
CACHE_DTYPE = "float32"  # what llama.cpp's dequantised weights are, exactly


@dataclass
class Source:
    """A checked source: the GGUF to load and what identifies its content."""

    reference: str
    info: GGUFInfo
    key: str  # the cache key
    digest: str  # "sha256:HEX" of the GGUF (the Ollama blob digest for an Ollama model)
    ollama: OllamaModel | None = None


def is_import_source(ref: str | Path) -> bool:
    """Whether `ref` names a GGUF file or an Ollama model rather than a directory or hub id."""
    text = str(ref)
    if is_ollama_ref(text):
        return True
    path = Path(text).expanduser()
    if path.is_dir():
        return False
    return text.lower().endswith(".gguf") or (path.is_file() and is_gguf_file(path))


def open_source(ref: str | Path) -> Source:
    """Check the source `ref` names (nothing is loaded or written)."""
    text = str(ref)
    if is_ollama_ref(text):
        ollama = read_model(text)
        name = text.split(":", 1)[1]
        info = inspect_gguf(ollama.model_blob, f"pull the model again (`ollama pull {name}`)")
        digests = {media: digest for media, digest in sorted(ollama.layer_digests.items())
                   if media.startswith("application/vnd.ollama.image.")}
        return Source(reference=text, info=info, key=_key(digests), digest=ollama.model_digest,
                      ollama=ollama)
    path = Path(text).expanduser()
    if not path.exists():
        raise LargeForgeError(f"GGUF file {path} not found")
    info = inspect_gguf(path)
    digest = "sha256:" + _sha256(path)
    return Source(reference=text, info=info, key=_key({"gguf": digest}), digest=digest)


def import_model(source: str | Path, output: str | Path, *, dtype: str = "float32",
                 overwrite: bool = False) -> Path:
    """Write the GGUF file or Ollama model `source` to `output` as a Hugging Face directory
    (weights in `dtype`, tokenizer, chat template, generation config) and return `output`.

    `output` must be new or empty unless `overwrite`; it is staged beside `output` and renamed
    into place, so a failure leaves nothing."""
    from largeforge.sources.convert import check_dtype, write_hf_directory
    from largeforge.staging import check_output, staged_output

    check_dtype(dtype)
    output = Path(output).expanduser()
    check_output(output, overwrite=overwrite)
    checked = open_source(source)
    with staged_output(output, overwrite=overwrite) as staging:
        write_hf_directory(checked.info, staging, dtype=dtype, ollama=checked.ollama,
                           source=checked.reference, digest=checked.digest)
    return output


def cache_dir() -> Path:
    from largeforge.cache_paths import cache_root

    return cache_root() / CACHE_SUBDIR


def resolve_source(ref: str | Path) -> str:
    """The cached Hugging Face directory of the source `ref`, imported on first use."""
    checked = open_source(ref)
    root = cache_dir()
    entry = root / checked.key
    if (entry / "config.json").is_file():
        return str(entry)
    from largeforge.sources.convert import write_hf_directory

    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(root)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f"{STAGING_PREFIX}{os.getpid()}-"))
    try:
        write_hf_directory(checked.info, staging, dtype=CACHE_DTYPE, ollama=checked.ollama,
                           source=checked.reference, digest=checked.digest)
        honour_umask(staging)  # read by a serving container too
        try:
            os.rename(staging, entry)
        except OSError:
            if not (entry / "config.json").is_file():  # not another process finishing first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(entry)


def _remove_abandoned_staging(root: Path) -> None:
    """Delete staging directories whose importing process no longer runs (killed imports)."""
    for staging in root.glob(f"{STAGING_PREFIX}*"):
        pid_text = staging.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if pid_text.isdigit() and not _alive(int(pid_text)):
            shutil.rmtree(staging, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _key(inputs: dict[str, str]) -> str:
    text = json.dumps({"format": CACHE_FORMAT, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
