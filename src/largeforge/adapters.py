"""LoRA adapter directories as `peft` writes them (adapter_config.json +
adapter_model.safetensors): recognising one, the base it names, and its weights.

A leaf below `models.py`, which loads an adapter merged into its base for inference; building
adapters for training is `training/lora.py`. Importing this module also quiets the logs that
`peft` and `bitsandbytes` print about things no user can act on.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from largeforge.damaged_files import (
    ADAPTER_REMEDY,
    ADAPTER_WEIGHTS,
    check_adapter_files,
    read_json_object,
    weights_error,
)
from largeforge.errors import LargeForgeError

# bitsandbytes' CPU backend logs, when peft imports it, that it could not fetch an optional
# kernel from the hub; it then uses its own, and there is nothing a user can do about it offline.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# An int8 model (`largeforge quantize --method int8`) logs on every forward that LLM.int8 casts
# its inputs to fp16: how the method works (see the quantize docs), not something to act on.
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
# peft still asks transformers for a property transformers has renamed; not the user's concern.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(adapter_dir: str | Path) -> str | None:
    """The base model an adapter names in its adapter_config.json, if any."""
    config = Path(adapter_dir) / ADAPTER_CONFIG
    if not config.is_file():
        raise LargeForgeError(
            f"{adapter_dir} is not a PEFT adapter directory: it has no {ADAPTER_CONFIG}"
        )
    settings = read_json_object(config, ADAPTER_REMEDY, ("peft_type",))
    base = settings.get("base_model_name_or_path")
    return base if isinstance(base, str) else None


def uses_adapters(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def load_adapter_weights(model: Any, directory: Path) -> None:
    """Put the adapter weights saved in `directory` into `model` (load_best_at_end)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    check_adapter_files(directory)
    set_peft_model_state_dict(model, load_file(directory / ADAPTER_WEIGHTS))


def load_adapter(base: Any, adapter_dir: str | Path, *, is_trainable: bool = False) -> Any:
    """`base` wrapped by peft with the adapter saved in `adapter_dir`; damaged adapter files
    (and weights that lack some of the adapter's tensors) are a `DamagedFileError`."""
    from peft import PeftModel, get_peft_model_state_dict

    directory = Path(adapter_dir)
    saved = check_adapter_files(directory)
    model = PeftModel.from_pretrained(base, str(directory), is_trainable=is_trainable)
    if saved is not None:
        missing = set(get_peft_model_state_dict(model)) - saved
        if missing:
            raise weights_error(directory, missing, "of the adapter are missing", ADAPTER_REMEDY)
    return model


