"""The model a run trains: every weight (`full`), LoRA adapters on a frozen base (`lora`), or LoRA
adapters on a base held in 4-bit NF4 (`qlora`).

Adapters are `peft`'s own (we do not re-implement LoRA): saved as adapter_config.json +
adapter_model.safetensors, so `peft.PeftModel.from_pretrained(base, DIR)` loads what we write.
QLoRA quantises the base through `bitsandbytes`, whose 4-bit kernels run on CPU as well as CUDA.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

# Importing largeforge.adapters also quiets bitsandbytes before peft imports it.
from largeforge.adapters import load_adapter
from largeforge.damaged_files import check_model_files
from largeforge.errors import LargeForgeError
from largeforge.models import load_model

if TYPE_CHECKING:
    from peft import LoraConfig

    from largeforge.config import Recipe

ALL_LINEAR = "all-linear"


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct short names of the layers LoRA can adapt (nn.Linear, GPT-2's Conv1D, and
    bitsandbytes' 4-bit linears, which subclass nn.Linear), the output head excluded."""
    from transformers.pytorch_utils import Conv1D

    head = getattr(model, "get_output_embeddings", lambda: None)()
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head
    }
    return sorted(names)


def check_target_modules(model: torch.nn.Module, targets: list[str]) -> None:
    """Every requested module name must exist in the model; the error lists those that do."""
    if targets == [ALL_LINEAR]:
        return
    available = linear_module_names(model)
    missing = [t for t in targets if t not in available]
    if missing:
        family = getattr(getattr(model, "config", None), "model_type", "this model")
        raise LargeForgeError(
            f"lora.target_modules {', '.join(missing)} not found in the {family} model; "
            f"its linear layers are: {', '.join(available)} (or use all-linear)"
        )


def lora_config(recipe: Recipe, *, fan_in_fan_out: bool = False) -> LoraConfig:
    """peft's LoraConfig from the recipe. `fan_in_fan_out`: the adapted layers store their weight
    transposed (GPT-2's Conv1D), which peft would otherwise fix with a warning."""
    from peft import LoraConfig

    cfg = recipe.lora
    targets: str | list[str] = (
        ALL_LINEAR if cfg.target_modules == [ALL_LINEAR] else list(cfg.target_modules)
    )
    if ALL_LINEAR in cfg.target_modules and len(cfg.target_modules) > 1:
        raise LargeForgeError("lora.target_modules: all-linear stands alone, not in a list")
    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
        use_dora=cfg.use_dora, task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out,
    )


def base_dtype(method: str, precision: str) -> torch.dtype:
    """Full training keeps fp32 master weights; a frozen LoRA base may sit in bf16."""
    return torch.bfloat16 if method == "lora" and precision == "bf16" else torch.float32


def load_quantized_base(ref: str, *, quant_type: str = "nf4", double_quant: bool = True,
                        compute_dtype: torch.dtype = torch.float32) -> Any:
    """The base model with every linear layer (but the head) in 4 bits, on CPU or CUDA."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LargeForgeError(
            "train.method=qlora needs bitsandbytes (pip install bitsandbytes): it holds the base "
            "weights in 4-bit NF4 (it runs on CPU and CUDA)"
        ) from None
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from largeforge.runs import resolve_model_dir

    ref = resolve_model_dir(ref)  # a GGUF file or Ollama model: its imported directory
    if Path(ref).is_dir():
        check_model_files(ref)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )
    device_map = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            ref, quantization_config=quantization, device_map=device_map, dtype=compute_dtype
        )
    except (ImportError, RuntimeError, ValueError) as exc:
        raise LargeForgeError(
            f"cannot load {ref} in 4 bits with bitsandbytes here: {exc}"
        ) from None
    # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place the first time it
    # runs without gradients (our evaluations) and unpacks it on every save, and the round trip
    # changes the frozen base slightly: training would depend on when it evaluated and saved,
    # and a resumed run (fresh base) would not repeat the uninterrupted one. The plain 4-bit
    # path is the one training takes anyway.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def model_for_training(recipe: Recipe, base_ref: str, precision: str,
                       checkpoint: Path | None = None) -> Any:
    """The model to optimise. For lora/qlora: the base (frozen, 4-bit for qlora) with fresh
    adapters, or with the adapters of `checkpoint` when resuming."""
    method = recipe.train.method
    if method == "full":
        return load_model(checkpoint or base_ref)
    if method == "qlora":
        compute = torch.bfloat16 if precision == "bf16" else torch.float32
        # The layers that stay unquantised (embeddings, norms) are in the compute dtype, as the
        # frozen LoRA base is. Not peft's prepare_model_for_kbit_training: it upcasts them to
        # fp32, which puts the whole residual stream in fp32 and doubles the activations kept
        # for backward (+550 MB RSS on the base preset); the loop's non-reentrant gradient
        # checkpointing needs none of its input-gradient hooks.
        base = load_quantized_base(
            base_ref, quant_type=recipe.lora.quant_type, double_quant=recipe.lora.double_quant,
            compute_dtype=compute,
        )
    else:
        base = load_model(base_ref, dtype=base_dtype(method, precision))
    for p in base.parameters():
        p.requires_grad_(False)
    check_target_modules(base, list(recipe.lora.target_modules))
    from peft import get_peft_model

    if checkpoint is not None:
        model = load_adapter(base, checkpoint, is_trainable=True)
    else:
        from transformers.pytorch_utils import Conv1D

        conv1d = any(isinstance(m, Conv1D) for m in base.modules())
        model = get_peft_model(base, lora_config(recipe, fan_in_fan_out=conv1d))
    for config in model.peft_config.values():  # the reference given, not where it was loaded
        config.base_model_name_or_path = base_ref  # from (an imported GGUF's cache directory)
    return model
