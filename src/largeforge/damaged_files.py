"""Damaged files a loader reads: truncated, garbage, empty, not the JSON it should be, or
short of tensors. Each becomes one `DamagedFileError` that names the file and says how to get
a good copy, instead of the parser's own traceback (`SafetensorError`, `JSONDecodeError`, ...).

The small files of a model, adapter or tokenizer directory and the headers of its safetensors
weights are checked before `transformers` or `peft` reads them (`check_model_files`,
`check_adapter_files`, `check_tokenizer_files`): they cost next to nothing, and some damage
would otherwise pass unnoticed (`transformers` ignores a broken generation_config.json). What
only a full read can tell (a tokenizer.json, a torch pickle) is looked at when its loader fails
(`tokenizer_json_problem`, `reading`). Torch-free: the first layer of docs/architecture.md.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from largeforge.errors import LargeForgeError

MODEL_REMEDY = "restore it, or download or export the model again"
ADAPTER_REMEDY = "restore it, or train or download the adapter again"
TOKENIZER_REMEDY = "restore it, or save or download the tokenizer again"
HUB_CACHE_REMEDY = ("delete the model from the Hugging Face cache (~/.cache/huggingface) and "
                    "download it again")

# Small JSON files that must hold an object, with the keys each must have.
MODEL_JSON = {"config.json": ("model_type",), "generation_config.json": (),
              "model.safetensors.index.json": ("weight_map",)}
ADAPTER_JSON = {"adapter_config.json": ("peft_type",)}
TOKENIZER_JSON = {"tokenizer_config.json": (), "special_tokens_map.json": (),
                  "added_tokens.json": ()}
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = ("pytorch_model*.bin", "model*.bin")


class DamagedFileError(LargeForgeError):
    """A file whose content is damaged: `path`, what is wrong with it and what to do."""

    def __init__(self, path: str | Path, problem: str, remedy: str) -> None:
        self.path, self.problem, self.remedy = Path(path), problem, remedy
        super().__init__(f"{path} is damaged ({problem}); {remedy}")

    def with_remedy(self, remedy: str) -> DamagedFileError:
        """The same damage with another thing to do (the caller knows better)."""
        return DamagedFileError(self.path, self.problem, remedy)


def first_line(exc: BaseException) -> str:
    """A library's message, on one line: its first sentence."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    end = line.find(". ")
    return line[:end] if end > 0 else line.rstrip(".")


@contextmanager
def reading(path: str | Path, remedy: str,
            errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Turn the parse `errors` a reader of `path` raises into a `DamagedFileError`."""
    try:
        yield
    except errors as exc:
        raise DamagedFileError(path, f"unreadable: {first_line(exc)}", remedy) from exc


def read_json_object(path: str | Path, remedy: str,
                     required: Collection[str] = ()) -> dict[str, Any]:
    """The JSON object in `path`, which must have the `required` keys."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DamagedFileError(path, "not UTF-8 text: garbage bytes", remedy) from None
    if not text.strip():
        raise DamagedFileError(path, "empty", remedy)
    try:
        value = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or a number too long to convert
        raise DamagedFileError(path, f"not valid JSON: {first_line(exc)}", remedy) from None
    except RecursionError:
        raise DamagedFileError(path, "JSON nested too deeply", remedy) from None
    if not isinstance(value, dict):
        kind = type(value).__name__.replace("NoneType", "null")
        raise DamagedFileError(path, f"a JSON {kind} where an object is expected", remedy)
    missing = [key for key in required if key not in value]
    if missing:
        raise DamagedFileError(path, f"no {missing[0]!r} key", remedy)
    return value


def check_json_files(directory: Path, files: dict[str, Collection[str]], remedy: str) -> None:
    """Each of `files` that `directory` holds is a JSON object with its required keys."""
    for name, required in files.items():
        if (directory / name).is_file():
            read_json_object(directory / name, remedy, required)


def hub_snapshot(hub_id: str) -> Path | None:
    """The directory of the hub model `hub_id` in the local Hugging Face cache, if it is
    there (nothing is downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    for name in ("config.json", "tokenizer_config.json"):
        try:
            found = try_to_load_from_cache(hub_id, name)
        except ValueError:  # not a valid repository id
            return None
        if isinstance(found, str):
            return Path(found).parent
    return None


def safetensors_keys(path: str | Path, remedy: str) -> set[str]:
    """The tensor names in a safetensors file, whose header and length are checked."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return set(handle.keys())
    except SafetensorError as exc:
        reason = first_line(exc).removeprefix("Error while deserializing header: ")
        raise DamagedFileError(path, f"truncated or not a safetensors file: {reason}",
                               remedy) from None


def check_model_files(directory: str | Path, remedy: str = MODEL_REMEDY) -> None:
    """The config files and safetensors weights of a model directory can be read."""
    directory = Path(directory)
    check_json_files(directory, MODEL_JSON, remedy)
    for weights in sorted(directory.glob("*.safetensors")):
        safetensors_keys(weights, remedy)


def check_pickled_weights(directory: str | Path, remedy: str = MODEL_REMEDY) -> None:
    """Pickled (.bin) weights are zip archives, as torch.save writes them; called when loading
    them failed, to tell a truncated or garbage file from other trouble."""
    for pattern in PICKLED_WEIGHTS:
        for weights in sorted(Path(directory).glob(pattern)):
            if not zipfile.is_zipfile(weights):
                raise DamagedFileError(weights, "truncated or not a torch weights file", remedy)


def weights_error(directory: str | Path, tensors: Collection[str], problem: str,
                  remedy: str = MODEL_REMEDY) -> DamagedFileError:
    """The weights file of `directory` that holds (or should hold) `tensors`, damaged:
    "N tensor(s) {problem}: names"."""
    directory = Path(directory)
    names = sorted(tensors)
    where = _weights_file_of(directory, names[0])
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return DamagedFileError(where, f"{len(names)} tensor(s) {problem}: {shown}", remedy)


def _weights_file_of(directory: Path, tensor: str) -> Path:
    index = directory / "model.safetensors.index.json"
    if index.is_file():  # sharded: the shard the index names for `tensor`
        weight_map = read_json_object(index, MODEL_REMEDY).get("weight_map")
        shard = weight_map.get(tensor) if isinstance(weight_map, dict) else None
        return directory / shard if isinstance(shard, str) else index
    for name in ("model.safetensors", ADAPTER_WEIGHTS, "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    found = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    return found[0] if found else directory


def check_adapter_files(directory: str | Path, remedy: str = ADAPTER_REMEDY) -> set[str] | None:
    """adapter_config.json and the adapter's safetensors weights can be read; returns the names
    of the tensors saved (None for an adapter saved as a .bin)."""
    directory = Path(directory)
    check_json_files(directory, ADAPTER_JSON, remedy)
    weights = directory / ADAPTER_WEIGHTS
    return safetensors_keys(weights, remedy) if weights.is_file() else None


def check_tokenizer_files(directory: str | Path, remedy: str = TOKENIZER_REMEDY,
                          config_remedy: str = MODEL_REMEDY) -> None:
    """The small JSON files of a tokenizer directory hold objects, and so does the config.json
    of a model directory, which `transformers` reads for the tokenizer's class (tokenizer.json,
    which can be large, is looked at by `tokenizer_json_problem` when loading fails)."""
    check_json_files(Path(directory), {"config.json": ()}, config_remedy)
    check_json_files(Path(directory), TOKENIZER_JSON, remedy)


def tokenizer_json_problem(directory: str | Path,
                           remedy: str = TOKENIZER_REMEDY) -> DamagedFileError | None:
    """What is wrong with the tokenizer.json of `directory`, if anything."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        read_json_object(path, remedy)
    except DamagedFileError as damaged:
        return damaged
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a plain Exception
        return DamagedFileError(path, f"not a tokenizer definition: {first_line(exc)}", remedy)
    return None

