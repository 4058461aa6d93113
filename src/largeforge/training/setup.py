"""How a run's model starts: the chat template an existing model needs, the model itself (built,
loaded, or adapted with LoRA/QLoRA), the teacher's tokenizer checked, and the best weights put
back at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from largeforge.config import Recipe
from largeforge.errors import LargeForgeError
from largeforge.models import build_model, load_model


def default_template(recipe: Recipe, fmt: str, tokenizer: Any) -> str | None:
    """None (the tokenizer's own template) when it has one. A model trained here from scratch
    learns chatml; an existing model without a template learns alpaca data in the Alpaca
    prompt format, but conversations need a template named by the user."""
    if getattr(tokenizer, "chat_template", None):
        return None
    if not recipe.model.from_pretrained:
        return "chatml"
    if fmt == "alpaca":
        return "alpaca"
    raise LargeForgeError(
        f"the model {recipe.model.from_pretrained} has no chat template, and {fmt} data is "
        "rendered through one: set data.chat_template (--chat-template) to a built-in name "
        "(chatml, llama-2, llama-3, mistral, phi-3, zephyr, alpaca) or a Jinja file"
    )


def base_model_ref(ref: str, method: str) -> str:
    """The base model as a path adapters can name (absolute), or a hub id. A GGUF file or an
    Ollama model stays the source itself, not its directory in the import cache, so an adapter
    still finds its base after the cache is cleared (the source is imported again)."""
    from largeforge.adapters import is_adapter_dir
    from largeforge.runs import resolve_model_dir
    from largeforge.sources.importer import is_import_source
    from largeforge.sources.ollama_store import is_ollama_ref

    resolved = resolve_model_dir(ref)
    if is_import_source(ref):
        return ref if is_ollama_ref(ref) else str(Path(ref).expanduser().resolve())
    if Path(resolved).exists():
        if method != "full" and is_adapter_dir(resolved):
            raise LargeForgeError(
                f"{ref} is a LoRA adapter: merge it into its base first (largeforge merge), "
                "then train new adapters on the merged model"
            )
        return str(Path(resolved).resolve())
    return resolved


def model_for_run(
    recipe: Recipe, checkpoint: Path | None, tokenizer: Any, precision: str
) -> Any:
    """The model to train: resumed from `checkpoint`, an existing model (full, LoRA or QLoRA),
    or a new one of the recipe's shape."""
    if recipe.model.from_pretrained:
        from largeforge.training.lora import model_for_training

        base = base_model_ref(recipe.model.from_pretrained, recipe.train.method)
        return model_for_training(recipe, base, precision, checkpoint)
    if checkpoint is not None:
        return load_model(checkpoint)
    return build_model(
        recipe.model.resolve(len(tokenizer)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def load_weights(model: Any, directory: Path) -> None:
    """Load the weights saved in `directory` (best/) into the model being trained."""
    from largeforge.adapters import load_adapter_weights, uses_adapters

    if uses_adapters(model):
        load_adapter_weights(model, directory)
        return
    saved = load_model(directory)
    model.load_state_dict(saved.state_dict())


def check_teacher_tokenizer(recipe: Recipe, tokenizer: Any) -> None:
    """Distillation compares distributions token by token: teacher and student share a
    vocabulary."""
    from largeforge.runs import resolve_model_dir
    from largeforge.tokenizer import load_tokenizer

    teacher_ref = str(recipe.distill.teacher)
    teacher_tokenizer = load_tokenizer(resolve_model_dir(teacher_ref))
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise LargeForgeError(
            f"the teacher {teacher_ref} and the student do not share a tokenizer "
            f"({len(teacher_tokenizer)} and {len(tokenizer)} tokens, vocabularies differ): "
            "distillation compares their distributions token by token; train the student with "
            "the teacher's tokenizer (tokenizer.path)"
        )
