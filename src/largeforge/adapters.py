"""LoRA adapter directories as `peft` writes them (adapter_config.json +
adapter_model.safetensors): recognising one, the base it names, and its weights.

A leaf below `models.py`, which loads an adapter merged into its base for inference; building
adapters for training is `training/lora.py`. Importing this module also quiets the logs that
`peft` and `bitsandbytes` print about things no user can act on.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

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
    return json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")


def uses_adapters(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def load_adapter_weights(model: Any, directory: Path) -> None:
    """Put the adapter weights saved in `directory` into `model` (load_best_at_end)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(directory / "adapter_model.safetensors"))


