"""Model references: what every command's `--model` accepts, turned into a model directory.

A model directory, a run directory (its `final/`, else `best/`, else its latest checkpoint), a
hub id, a GGUF file or an Ollama model (`ollama:NAME[:TAG]`); the last two are imported once
into a Hugging Face directory in the cache (`largeforge.sources.importer`). Torch-free, so that
commands can check their arguments before the slow imports.
"""

from __future__ import annotations

from pathlib import Path

from largeforge.errors import LargeForgeError
from largeforge.runs.run_dir import BEST_DIR, FINAL_DIR, RECIPE_FILE, RunDir, is_model_dir


def resolve_model_dir(ref: str | Path) -> str:
    """Turn a model reference into something `from_pretrained` accepts.

    Local paths must exist; a string that is not a local path is passed on as a hub id. A GGUF
    file or `ollama:NAME[:TAG]` becomes its imported directory in the cache.
    """
    from largeforge.sources.importer import is_import_source  # torch-free, as this module is

    if is_import_source(ref):
        from largeforge.sources.importer import resolve_source

        return resolve_source(ref)
    path = Path(ref).expanduser()
    if path.exists():
        if is_model_dir(path):
            return str(path)
        run = RunDir(path)
        if run.is_run():
            model = run.model_dir()
            if model is not None:
                return str(model)
            raise LargeForgeError(
                f"run directory {path} has no {FINAL_DIR}/, {BEST_DIR}/ or checkpoint yet"
            )
        raise LargeForgeError(
            f"{path} is neither a model directory (no config.json or adapter_config.json) nor "
            f"a run directory "
            f"(no {RECIPE_FILE})"
        )
    text = str(ref)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    # `runs/typo` names a directory here, not the hub user `runs`.
    if not looks_like_hub_id or Path(text.split("/")[0]).is_dir():
        raise LargeForgeError(f"model {text!r} not found: no such directory")
    return text


def not_cached_error(hub_id: str) -> LargeForgeError:
    """What to say when a hub id is neither in the local Hugging Face cache nor downloadable."""
    return LargeForgeError(
        f"model {hub_id!r} is not in the local Hugging Face cache and could not be downloaded; "
        f"fetch it where there is network (`huggingface-cli download {hub_id}`) and copy the "
        "cache (~/.cache/huggingface) here, or pass a local model directory"
    )
