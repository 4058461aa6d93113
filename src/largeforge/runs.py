"""Run directories and model references.

A run directory `runs/<name>/` holds `recipe.yaml`, `metrics.jsonl`, `tensorboard/`,
`checkpoints/step-N/`, `best/` and `final/`. Every command that takes a model accepts a model
directory, a run directory (its `final/`, else `best/`, else its latest checkpoint), a hub id,
a GGUF file or an Ollama model (`ollama:NAME[:TAG]`); the last two are imported once into a
Hugging Face directory in the cache (`largeforge.sources.importer`).
"""

from __future__ import annotations

from pathlib import Path

from largeforge.errors import LargeForgeError

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"


def is_model_dir(path: Path) -> bool:
    """A Hugging Face model directory, or a PEFT adapter directory (which names its base)."""
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def is_run_dir(path: Path) -> bool:
    return (path / RECIPE_FILE).is_file()


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint named by `checkpoints/latest`, which is only ever written after the
    checkpoint it names is complete."""
    pointer = run_dir / CHECKPOINTS_DIR / LATEST_FILE
    if not pointer.is_file():
        return None
    target = run_dir / CHECKPOINTS_DIR / pointer.read_text(encoding="utf-8").strip()
    return target if target.is_dir() else None


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
        if is_run_dir(path):
            for candidate in (path / "final", path / "best"):
                if is_model_dir(candidate):
                    return str(candidate)
            ckpt = latest_checkpoint(path)
            if ckpt is not None and is_model_dir(ckpt):
                return str(ckpt)
            raise LargeForgeError(f"run directory {path} has no final/, best/ or checkpoint yet")
        raise LargeForgeError(
            f"{path} is neither a model directory (no config.json or adapter_config.json) nor "
            f"a run directory "
            f"(no {RECIPE_FILE})"
        )
    text = str(ref)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise LargeForgeError(f"model {text!r} not found: no such directory")
    return text


def not_cached_error(hub_id: str) -> LargeForgeError:
    """What to say when a hub id is neither in the local Hugging Face cache nor downloadable."""
    return LargeForgeError(
        f"model {hub_id!r} is not in the local Hugging Face cache and could not be downloaded; "
        f"fetch it where there is network (`huggingface-cli download {hub_id}`) and copy the "
        "cache (~/.cache/huggingface) here, or pass a local model directory"
    )
