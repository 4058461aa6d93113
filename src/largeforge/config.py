"""Recipes: validated YAML with layered overrides and provenance.

Values resolve as defaults < file < environment (`LARGEFORGE_<SECTION>__<KEY>`) < command-line
flags < `--set section.key=value`. Every leaf remembers where its value came from, so
`largeforge config show` can say it, and every error names the key and the file or flag.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from largeforge.errors import LargeForgeError
from largeforge.text_files import read_yaml_mapping

if TYPE_CHECKING:  # models imports torch; the CLI reads this schema to build its flags
    from largeforge.models import ModelConfig

ENV_PREFIX = "LARGEFORGE_"


class _Section(BaseModel):
    # inf and nan are no learning rate, temperature or ratio: refused like any other bad value
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# What torch's generators take as a seed; a larger one failed deep inside a run or a request.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1

# Ids are 32-bit in `tokenizers`, and its trainer allocates per possible token up front: 4e9
# aborted the process. The largest released vocabularies hold about 256k tokens.
MAX_VOCAB_SIZE = 1_000_000


class ModelSection(_Section):
    """Which model to train: a preset with optional overrides, or an existing HF model."""

    preset: str = Field("tiny", description="model shape to build: tiny, small, medium, base")
    from_pretrained: str | None = Field(
        None, description="an existing model to start from instead of a preset: a model "
        "directory, a run or a hub id",
    )
    dim: int | None = Field(None, gt=0)
    n_layers: int | None = Field(None, gt=0)
    n_heads: int | None = Field(None, gt=0)
    n_kv_heads: int | None = Field(None, gt=0)
    hidden_dim: int | None = Field(None, gt=0)
    vocab_size: int | None = Field(
        None, gt=0, le=MAX_VOCAB_SIZE,
        description="defaults to the tokenizer's size; may be larger, never smaller",
    )
    max_seq_len: int | None = Field(None, gt=0)
    rope_theta: float | None = Field(None, gt=0)
    tie_embeddings: bool | None = None
    dropout: float | None = Field(None, ge=0.0, lt=1.0)

    def resolve(self, tokenizer_size: int) -> ModelConfig:
        """The concrete model shape: the preset, then every override that is set."""
        from largeforge.models import ModelConfig, preset

        base = preset(self.preset).model_dump()
        overrides = {
            k: v
            for k, v in self.model_dump().items()
            if k not in ("preset", "from_pretrained") and v is not None
        }
        base.update(overrides)
        vocab = overrides.get("vocab_size", tokenizer_size)
        if vocab < tokenizer_size:
            raise LargeForgeError(
                f"model.vocab_size ({vocab}) is smaller than the tokenizer's vocabulary "
                f"({tokenizer_size}); leave it unset or make it at least {tokenizer_size}"
            )
        base["vocab_size"] = vocab
        try:
            return ModelConfig(**base)
        except ValidationError as exc:
            raise LargeForgeError(f"model section: {_first_error(exc)}") from None


class TokenizerSection(_Section):
    path: str | None = Field(
        None, description="an existing tokenizer or model directory; unset: train one"
    )
    vocab_size: int = Field(4096, gt=0, le=MAX_VOCAB_SIZE,
                            description="size of the tokenizer trained when no path")
    min_frequency: int = Field(2, ge=1)


class DataSection(_Section):
    train: list[str] = Field(
        default_factory=list, description="training data: files, directories or globs"
    )
    eval: list[str] = Field(
        default_factory=list,
        description="instruction data to evaluate on; unset: val_percent of train is held out",
    )
    text_field: str = "text"
    doc_separator: str | None = "<|endoftext|>"
    val_percent: float = Field(10.0, ge=0.0, lt=100.0)
    split: Literal["document", "tail"] = "document"
    seq_len: int = Field(256, gt=0, description="training sequence length in tokens")
    cache_dir: str | None = None
    # Instruction and chat data (alpaca, sharegpt, messages); plain text is pretraining data.
    format: Literal["auto", "text", "alpaca", "sharegpt", "messages"] = Field(
        "auto", description="what the records are; auto: told by their fields"
    )
    chat_template: str | None = Field(
        None, description="built-in name or Jinja file; default: the tokenizer's own, else chatml"
    )
    train_on_prompt: bool = False
    packing: bool = Field(False, description="several samples per sequence, no cross-attention")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="samples longer than seq_len: cut at the end, or left out"
    )


class LoraSection(_Section):
    """LoRA (and QLoRA) adapters through `peft`, used when train.method is lora or qlora."""

    r: int = Field(8, gt=0, description="rank of the update matrices")
    alpha: float = Field(16.0, gt=0, description="scaling: the update is multiplied by alpha/r")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the adapters' input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        description="module names (q_proj, v_proj, ...) or all-linear (every linear but the head)",
    )
    use_dora: bool = Field(False, description="weight-decomposed LoRA (DoRA)")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="qlora: 4-bit type of the base")
    double_quant: bool = Field(True, description="qlora: also quantise the quantisation scales")


class PreferenceSection(_Section):
    """DPO, ORPO and SimPO, used when train.objective is dpo, orpo or simpo."""

    beta: float = Field(0.1, gt=0, description="DPO: KL strength; ORPO: weight of the odds "
                        "ratio; SimPO: scale of the length-normalised reward")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="DPO: conservative DPO")
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="DPO loss variant")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO: target reward margin (gamma)")


class DistillSection(_Section):
    """Knowledge distillation, used when train.objective is distill."""

    teacher: str | None = Field(None, description="the teacher: a model directory, run or hub id")
    temperature: float = Field(1.0, gt=0, description="softens both distributions (T)")
    alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="weight of the KL term; 1 - alpha weighs cross-entropy"
    )


class TrainSection(_Section):
    method: Literal["full", "lora", "qlora"] = Field(
        "full", description="train every weight, or LoRA adapters on a frozen (4-bit) base"
    )
    objective: Literal["lm", "dpo", "orpo", "simpo", "distill"] = Field(
        "lm", description="next-token loss, preference optimisation on chosen/rejected pairs "
        "(dpo, orpo, simpo), or distillation from distill.teacher"
    )
    batch_size: int = Field(8, gt=0, description="sequences per micro-batch")
    grad_accum: int = Field(
        1, gt=0, description="micro-batches per optimizer step (gradient accumulation)"
    )
    max_steps: int = Field(1000, gt=0, description="optimizer steps to train")
    num_epochs: float | None = Field(
        None, gt=0, description="passes over the training data; when set, overrides max_steps"
    )
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    min_lr: float | None = Field(None, ge=0, description="end of the cosine; default lr/10")
    warmup_steps: int = Field(100, ge=0)
    warmup_ratio: float | None = Field(
        None, ge=0, lt=1, description="warmup as a fraction of all steps; overrides warmup_steps"
    )
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="0 turns clipping off")
    eval_every: int = Field(200, gt=0, description="evaluate every N steps")
    eval_batches: int = Field(20, gt=0)
    save_every: int | None = Field(None, gt=0, description="default: eval_every")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, gt=0)
    early_stopping_patience: int | None = Field(
        None, gt=0, description="stop after this many evaluations without a better val loss"
    )
    load_best_at_end: bool = Field(
        True, description="final/ holds the weights of the best evaluation, not the last step"
    )
    seed: int = Field(1337, ge=SEED_MIN, le=SEED_MAX)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="number format of training; auto: bf16 where it is fast, else fp32"
    )
    device: str = "auto"
    compile: bool = False
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass to save memory"
    )
    threads: int | None = Field(None, gt=0, description="torch intra-op threads")
    distributed: Literal["auto", "none", "ddp", "fsdp"] = Field(
        "auto", description="several processes (torchrun, --nproc): ddp replicates the model, "
        "fsdp shards it (FSDP2); auto: ddp under torchrun with 2+ processes, else none",
    )
    dist_timeout: float = Field(
        600.0, gt=0, description="seconds a process waits for the others (a collective, a "
        "barrier) before the run fails",
    )


class OutputSection(_Section):
    dir: str = Field("runs", description="parent directory of runs")
    name: str | None = Field(
        None, description="run name: the run goes to <dir>/<name>; default: the recipe file or "
        "strategy name",
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str | None) -> str | None:
        """A run is a directory inside output.dir: its name holds no path."""
        if name is not None and (not name.strip() or name in (".", "..")
                                 or any(sep in name for sep in ("/", "\\", "\0"))):
            raise ValueError(f"a run name is one directory name (no '/', not '..'): {name!r}")
        return name


class Recipe(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    data: DataSection = Field(default_factory=DataSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    preference: PreferenceSection = Field(default_factory=PreferenceSection)
    distill: DistillSection = Field(default_factory=DistillSection)
    train: TrainSection = Field(default_factory=TrainSection)
    output: OutputSection = Field(default_factory=OutputSection)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / (self.output.name or "run")


# Keys that may change between a run and its resumption without changing its results.
RESUME_IGNORED_KEYS = {"train.log_every", "train.threads", "train.dist_timeout", "output.dir",
                       "output.name"}


@dataclass
class ResolvedRecipe:
    recipe: Recipe
    sources: dict[str, str] = field(default_factory=dict)

    def rows(self) -> list[tuple[str, Any, str]]:
        """(dotted key, value, where it came from) for every leaf, in schema order."""
        flat = _flatten(self.recipe.model_dump(mode="json"))
        return [(key, value, self.sources.get(key, "default")) for key, value in flat.items()]


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {err['msg']}" if loc else err["msg"]


def _check_keys(layer: Mapping[str, Any], origin: str) -> None:
    """Unknown keys are errors that name the key and where it came from."""
    for section, body in layer.items():
        if section not in Recipe.model_fields:
            _unknown(section, list(Recipe.model_fields), origin)
        if not isinstance(body, Mapping):
            raise LargeForgeError(
                f"{origin}: '{section}' must be a mapping of keys, got {type(body).__name__}"
            )
        section_model = Recipe.model_fields[section].annotation
        assert isinstance(section_model, type) and issubclass(section_model, BaseModel)
        for key in body:
            if key not in section_model.model_fields:
                _unknown(f"{section}.{key}", list(section_model.model_fields), origin)


def _unknown(key: str, allowed: list[str], origin: str) -> None:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of: {', '.join(allowed)}"
    raise LargeForgeError(f"unknown recipe key '{key}' in {origin}{hint}")


def _merge(base: dict[str, Any], layer: Mapping[str, Any], origin: str, sources: dict) -> None:
    for section, body in layer.items():
        target = base.setdefault(section, {})
        for key, value in body.items():
            target[key] = value
            sources[f"{section}.{key}"] = origin


def _read_yaml(path: Path) -> Mapping[str, Any]:
    """A recipe (or strategy, or saved run recipe) file: the shared YAML reader, so its
    messages ("recipe file X not found", "X:3: invalid YAML", "a recipe must be a mapping of
    sections") read as those of every other YAML file LargeForge takes."""
    return read_yaml_mapping(path, "recipe file", of="sections")


def parse_assignment(text: str, origin: str = "--set") -> tuple[str, Any]:
    """`section.key=value` -> ("section.key", typed value). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise LargeForgeError(f"{origin} {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key.count(".") != 1:
        raise LargeForgeError(f"{origin} {text!r}: the key must look like section.key")
    return key, _parse_value(raw)


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw


def _nest(assignments: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    nested: dict[str, dict[str, Any]] = {}
    for dotted, value in assignments.items():
        section, key = dotted.split(".", 1)
        nested.setdefault(section, {})[key] = value
    return nested


def env_layer(environ: Mapping[str, str]) -> dict[str, tuple[dict[str, Any], str]]:
    """Recipe values from `LARGEFORGE_<SECTION>__<KEY>` variables, each with its origin."""
    layer: dict[str, tuple[dict[str, Any], str]] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].partition("__")
        dotted = f"{section.lower()}.{key.lower()}"
        layer[dotted] = (_nest({dotted: _parse_value(environ[name])}), f"env {name}")
    return layer


def load_recipe(
    config: str | Path | Mapping[str, Any] | None = None,
    *,
    config_name: str = "recipe",
    strategy: str | None = None,
    strategy_file: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
    flag_options: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    defaults_name: str = "command default",
) -> ResolvedRecipe:
    """Resolve a recipe from its layers; raises LargeForgeError naming the bad key and origin.

    `config` is a file holding one recipe (or the recipe itself as a mapping, reported as
    `config_name`); `strategy_file` holds several under `strategies:`
    (with optional shared `defaults:`), and `strategy` picks one. `flags` are dotted keys set by
    command-line options, and `flag_options` the option that set each (for messages);
    `overrides` are `section.key=value` strings from `--set`. `defaults`
    (dotted keys) sit below every other layer: a command's own defaults, such as those of SFT.
    """
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    default_name: str | None = None
    if defaults:
        layer = _nest(dict(defaults))
        _check_keys(layer, defaults_name)
        _merge(merged, layer, defaults_name, sources)

    if config is not None and strategy is not None:
        raise LargeForgeError("give either --config or --strategy, not both")
    if isinstance(config, Mapping):
        _check_keys(config, config_name)
        _merge(merged, config, config_name, sources)
    elif config is not None:
        path = Path(config)
        data = _read_yaml(path)
        _check_keys(data, str(path))
        _merge(merged, data, str(path), sources)
        default_name = path.stem
    elif strategy is not None or strategy_file is not None:
        if strategy is None or strategy_file is None:
            raise LargeForgeError("--strategy NAME needs --strategy-file FILE, and vice versa")
        path = Path(strategy_file)
        data = _read_yaml(path)
        unknown_top = set(data) - {"strategies", "defaults"}
        if unknown_top or not isinstance(data.get("strategies"), Mapping):
            raise LargeForgeError(
                f"{path}: a strategy file holds 'strategies:' (name -> recipe) and optionally "
                f"'defaults:'; found {', '.join(map(repr, data)) or 'nothing'}"
            )
        strategies = data["strategies"]
        if strategy not in strategies:
            raise LargeForgeError(
                f"strategy {strategy!r} not found in {path}; it has: {', '.join(strategies)}"
            )
        if data.get("defaults"):
            _check_keys(data["defaults"], f"{path} (defaults)")
            _merge(merged, data["defaults"], f"{path} (defaults)", sources)
        body = strategies[strategy] or {}
        origin = f"{path} (strategy {strategy})"
        _check_keys(body, origin)
        _merge(merged, body, origin, sources)
        default_name = strategy

    for _dotted, (layer, origin) in env_layer(os.environ if environ is None else environ).items():
        _check_keys(layer, origin)
        _merge(merged, layer, origin, sources)

    for dotted, value in (flags or {}).items():
        if value is None:
            continue
        layer = _nest({dotted: value})
        option = (flag_options or {}).get(dotted) or "--" + dotted.split(".", 1)[1].replace(
            "_", "-")
        _check_keys(layer, f"flag {option}")
        _merge(merged, layer, f"flag {option}", sources)

    for text in overrides:
        dotted, value = parse_assignment(text)
        layer = _nest({dotted: value})
        _check_keys(layer, f"--set {text}")
        _merge(merged, layer, f"--set {text}", sources)

    if "name" not in merged.get("output", {}) and default_name:
        merged.setdefault("output", {})["name"] = default_name
        sources["output.name"] = "recipe name"

    try:
        recipe = Recipe.model_validate(merged)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            dotted = ".".join(str(p) for p in err["loc"][:2])
            origin = sources.get(dotted, "default")
            got = err.get("input")
            problems.append(f"{dotted} (from {origin}): {err['msg']}, got {got!r}")
        raise LargeForgeError("invalid recipe: " + "; ".join(problems)) from None
    return ResolvedRecipe(recipe=recipe, sources=sources)


def recipe_differences(old: Recipe, new: Recipe) -> list[str]:
    """Human lines for every key that differs, except keys that cannot change the results."""
    a = _flatten(old.model_dump(mode="json"))
    b = _flatten(new.model_dump(mode="json"))
    return [
        f"{key}: {a.get(key)!r} in the checkpoint, {b.get(key)!r} now"
        for key in sorted(set(a) | set(b))
        if key not in RESUME_IGNORED_KEYS and a.get(key) != b.get(key)
    ]


def recipe_from_yaml(path: Path) -> Recipe:
    """Read a resolved recipe saved in a run directory."""
    data = _read_yaml(path)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise LargeForgeError(f"{path}: {_first_error(exc)}") from None
