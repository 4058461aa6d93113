"""Supervised fine-tuning of an existing causal LM: full, LoRA or QLoRA, on instruction data.

SFT is the one training loop (`loop.train`) with a recipe whose model comes from a directory, a
run or a hub id, and whose data are alpaca, sharegpt or messages records (`train(..., sft=True)`
refuses anything else). This module holds what is particular to it: its defaults and
`SFTTrainer`, the Python entry point in the spirit of TRL's:

    from peft import LoraConfig
    from largeforge import SFTTrainer

    SFTTrainer(model="runs/base/final", train_dataset="data.jsonl",
               lora_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
               output_dir="runs/sft").train()
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

import largeforge.adapters  # noqa: F401  (quiets bitsandbytes before peft imports it)
from largeforge.config import ResolvedRecipe, load_recipe
from largeforge.errors import LargeForgeError

# Below the recipe file, the environment and the flags: what SFT users of TRL, LLaMA-Factory and
# torchtune expect rather than the pretraining defaults (lr 1e-3, 100 warm-up steps).
SFT_DEFAULTS: dict[str, Any] = {
    "train.method": "lora",
    "train.lr": 2e-4,
    "train.warmup_ratio": 0.03,
    "train.weight_decay": 0.0,
    "train.batch_size": 4,
    "train.eval_every": 100,
    "train.log_every": 5,
    "data.seq_len": 1024,
}
FULL_LR = 2e-5  # full fine-tuning moves every weight: a tenth of the LoRA rate
# DPO and ORPO start from a tuned model and push on a margin: lower rates (TRL: 1e-6 full).
PREFERENCE_LR = {False: 5e-5, True: 1e-6}  # keyed by "full"
DEFAULT_EPOCHS = 3.0


def resolve_sft_recipe(
    config: str | Path | Mapping[str, Any] | None = None,
    *,
    flags: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    output: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    require: bool = True,
) -> ResolvedRecipe:
    """An SFT recipe from its layers: SFT defaults < file < environment < flags < --set.

    `output` is the run directory itself (its parent becomes output.dir, its name output.name).
    `require`: a model and data must be named (False to only show what resolves).
    """
    options = getattr(flags, "options", None)  # the option that set each key, for messages
    flags = dict(flags or {})
    if output is not None:
        out = Path(output)
        flags["output.dir"], flags["output.name"] = str(out.parent), out.name
    resolved = load_recipe(
        config, flags=flags, flag_options=options, overrides=overrides, environ=environ,
        defaults=SFT_DEFAULTS,
        defaults_name="train sft default",
    )
    recipe, sources = resolved.recipe, resolved.sources
    if sources.get("train.lr") == "train sft default":
        preference = recipe.train.objective != "lm"
        full = recipe.train.method == "full"
        if preference or full:
            recipe.train.lr = PREFERENCE_LR[full] if preference else FULL_LR
            sources["train.lr"] = (
                f"train sft default ({recipe.train.objective + ', ' if preference else ''}"
                f"{recipe.train.method})"
            )
    if "train.max_steps" not in sources and "train.num_epochs" not in sources:
        recipe.train.num_epochs = DEFAULT_EPOCHS
        sources["train.num_epochs"] = "train sft default"
    if not require:
        return resolved
    if not recipe.model.from_pretrained:
        raise LargeForgeError(
            "SFT needs a model to fine-tune: pass --model (a model directory, a run or a hub id) "
            "or set model.from_pretrained"
        )
    if not recipe.data.train:
        raise LargeForgeError("SFT needs data: pass --dataset FILE or set data.train")
    if sources.get("data.seq_len") == "train sft default":
        context = _model_context(recipe.model.from_pretrained)
        if context is not None and context < recipe.data.seq_len:
            recipe.data.seq_len = context
            sources["data.seq_len"] = "train sft default (the model's context)"
    return resolved


def _model_context(ref: str) -> int | None:
    """The model's maximum sequence length from its config, when it can be read here; None
    otherwise (loading the model later reports what is wrong)."""
    from transformers import AutoConfig

    from largeforge.adapters import adapter_base, is_adapter_dir
    from largeforge.runs import resolve_model_dir

    try:
        resolved = resolve_model_dir(ref)
        if is_adapter_dir(resolved):
            resolved = adapter_base(resolved) or resolved
        config = AutoConfig.from_pretrained(resolved, local_files_only=True)
    except (LargeForgeError, OSError, ValueError):
        return None
    context = getattr(config, "max_position_embeddings", None)
    return int(context) if context else None


class SFTTrainer:
    """Fine-tune `model` on `train_dataset`; `.train()` runs it and returns a `TrainResult`.

    - `model`: a model directory, run directory or hub id, or a loaded `transformers` model
      (saved once under the LargeForge cache, by content, so adapters can name their base).
    - `tokenizer`: a tokenizer object or directory; default: the model's own. Needed with a
      model object that was not loaded from a directory holding its tokenizer.
    - `train_dataset` / `eval_dataset`: a file, directory or glob (alpaca, sharegpt or messages
      records, any format `largeforge data` reads), a list of such records, or a
      `datasets.Dataset` (written once as JSONL under the cache). Without `eval_dataset`, 10% of
      the training records are held out.
    - `lora_config`: a `peft.LoraConfig` (LoRA; `qlora=True` keeps the base in 4-bit NF4), or
      None for full fine-tuning unless `method` says otherwise.
    - Any other recipe key through `config` (a recipe file or mapping) and `overrides`
      (`["train.eval_every=50", ...]`); the common ones are keyword arguments.
    """

    def __init__(
        self,
        model: Any,
        train_dataset: Any,
        *,
        output_dir: str | Path,
        eval_dataset: Any = None,
        tokenizer: Any = None,
        lora_config: Any = None,
        qlora: bool = False,
        method: str | None = None,
        num_epochs: float | None = None,
        max_steps: int | None = None,
        learning_rate: float | None = None,
        batch_size: int | None = None,
        grad_accum: int | None = None,
        seq_len: int | None = None,
        chat_template: str | None = None,
        precision: str | None = None,
        config: str | Path | Mapping[str, Any] | None = None,
        overrides: Sequence[str] = (),
        console: Console | None = None,
    ) -> None:
        if method is None:
            method = ("qlora" if qlora else "lora") if lora_config is not None else "full"
        model_ref = _model_ref(model)
        if tokenizer is None and not isinstance(model, (str, os.PathLike)):
            tokenizer = _own_tokenizer_dir(model)
        flags: dict[str, Any] = {
            "model.from_pretrained": model_ref,
            "tokenizer.path": _tokenizer_ref(tokenizer) if tokenizer is not None else None,
            "data.train": _dataset_paths(train_dataset, "train"),
            "data.eval": _dataset_paths(eval_dataset, "eval") if eval_dataset is not None
            else None,
            "train.method": method,
            "train.num_epochs": num_epochs,
            "train.max_steps": max_steps,
            "train.lr": learning_rate,
            "train.batch_size": batch_size,
            "train.grad_accum": grad_accum,
            "data.seq_len": seq_len,
            "data.chat_template": chat_template,
            "train.precision": precision,
        }
        if lora_config is not None:
            flags.update(_lora_flags(lora_config))
        self.resolved = resolve_sft_recipe(
            config, flags={k: v for k, v in flags.items() if v is not None},
            overrides=overrides, output=output_dir,
        )
        self.console = console

    @property
    def recipe(self) -> Any:
        return self.resolved.recipe

    def train(self, *, resume: str | Path | None = None, overwrite: bool = False) -> Any:
        from largeforge.training.loop import train

        return train(self.resolved, resume=resume, overwrite=overwrite, console=self.console,
                     sft=True)


def _lora_flags(lora_config: Any) -> dict[str, Any]:
    """A `peft.LoraConfig` as recipe keys; options the recipe does not carry are refused rather
    than silently dropped."""
    from peft import LoraConfig

    if not isinstance(lora_config, LoraConfig):
        raise LargeForgeError(
            f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}"
        )
    carried = {"r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "task_type",
               "base_model_name_or_path", "peft_type", "revision", "inference_mode"}
    default = LoraConfig().to_dict()
    given = lora_config.to_dict()
    extra = sorted(k for k, v in given.items() if k not in carried and v != default.get(k))
    if extra:
        raise LargeForgeError(
            f"lora_config sets {', '.join(extra)}, which LargeForge recipes do not carry; "
            "supported: r, lora_alpha, lora_dropout, target_modules, use_dora"
        )
    targets = lora_config.target_modules
    if targets is None:
        target_list = ["all-linear"]
    elif isinstance(targets, str):
        target_list = [targets]
    else:
        target_list = sorted(targets)
    return {
        "lora.r": lora_config.r,
        "lora.alpha": float(lora_config.lora_alpha),
        "lora.dropout": lora_config.lora_dropout,
        "lora.target_modules": target_list,
        "lora.use_dora": bool(lora_config.use_dora),
    }


def _cache_root() -> Path:
    from largeforge.cache_paths import cache_root

    return cache_root()


def _model_ref(model: Any) -> str:
    """A reference the recipe can hold: paths and hub ids as they are; a model object saved under
    the cache, named by a hash of its files (the same model is saved once)."""
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    if not hasattr(model, "save_pretrained"):
        raise LargeForgeError(
            f"model must be a path, a hub id or a transformers model, got {type(model).__name__}"
        )
    return _save_by_content(model, "models")


def _save_by_content(obj: Any, kind: str) -> str:
    """`obj.save_pretrained` into `<cache>/<kind>/<hash of the files>`."""
    root = _cache_root() / kind
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".save-"))
    try:
        obj.save_pretrained(tmp)
        digest = hashlib.sha256()
        for file in sorted(tmp.iterdir()):
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
        target = root / digest.hexdigest()[:20]
        if target.is_dir():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)


def _own_tokenizer_dir(model: Any) -> str:
    """The directory a model object was loaded from, when its tokenizer is there too."""
    source = Path(str(getattr(model, "name_or_path", "") or ""))
    if source.is_dir() and any((source / f).is_file() for f in ("tokenizer.json",
                                                                "tokenizer_config.json")):
        return str(source)
    raise LargeForgeError(
        "this model object was not loaded from a directory with its tokenizer: pass "
        "tokenizer= (a tokenizer object or directory)"
    )


def _tokenizer_ref(tokenizer: Any) -> str:
    """A tokenizer directory; a tokenizer object is saved under the cache by content."""
    if isinstance(tokenizer, (str, os.PathLike)):
        return str(tokenizer)
    if not hasattr(tokenizer, "save_pretrained"):
        raise LargeForgeError(
            f"tokenizer must be a directory or a transformers tokenizer, got "
            f"{type(tokenizer).__name__}"
        )
    return _save_by_content(tokenizer, "tokenizers")


def _dataset_paths(dataset: Any, role: str) -> list[str]:
    """Paths as they are; records (a list of dicts or a `datasets.Dataset`) written once as
    JSONL under the cache, named by a hash of their content."""
    if isinstance(dataset, (str, os.PathLike)):
        return [str(dataset)]
    if isinstance(dataset, Sequence) and all(isinstance(d, (str, os.PathLike)) for d in dataset):
        return [str(d) for d in dataset]
    if hasattr(dataset, "to_list"):  # datasets.Dataset
        dataset = dataset.to_list()
    if not isinstance(dataset, Sequence) or not all(isinstance(r, Mapping) for r in dataset):
        raise LargeForgeError(
            f"{role}_dataset must be a path, a list of records (dicts) or a datasets.Dataset"
        )
    if not dataset:
        raise LargeForgeError(f"{role}_dataset is empty")
    text = "".join(json.dumps(dict(r), ensure_ascii=False, sort_keys=True) + "\n"
                   for r in dataset)
    root = _cache_root() / "datasets"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{hashlib.sha256(text.encode()).hexdigest()[:20]}.jsonl"
    if not path.is_file():
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".write-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    return [str(path)]
