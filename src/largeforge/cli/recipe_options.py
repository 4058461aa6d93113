"""Command-line options shared by every command that reads a recipe, and the one table of recipe
flags.

A recipe flag is a command-line option that sets one recipe key (`--lr` sets `train.lr`). Each is
declared once, in `RECIPE_FLAGS`: its name, the key, and a short option where it has one. Its
help text and type come from the key's field in `largeforge.config.Recipe` (the pydantic
`Field(description=...)` and annotation), so the schema, the recipe files and every command's
`--help` say the same thing. A command asks for the flags it takes with `@recipe_flags(...)`,
which adds them to its signature (typer reads parameters from signatures) and hands the given
ones to the command as one dict of dotted keys. `train`, `train sft`/`dpo`/`orpo`/`simpo`, `train
distill` and `config show` therefore cannot disagree about what a flag is called, what it sets,
or what its help says; adding a flag is one line in `RECIPE_FLAGS` and its name in the command's
`@recipe_flags(...)` list.

Options that are not recipe keys (`--config`, `--set`, `--resume`, `--output`, ...) stay declared
where they are used, below or in their command.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union

import typer

from largeforge.errors import LargeForgeError

if TYPE_CHECKING:  # imported when used, so `largeforge --help` does not load torch
    from pydantic.fields import FieldInfo

    from largeforge.config import ResolvedRecipe

ConfigOpt = typer.Option(None, "--config", "-c", help="A YAML file holding one recipe.")
StrategyOpt = typer.Option(None, "--strategy", help="Name of a strategy in --strategy-file.")
StrategyFileOpt = typer.Option(None, "--strategy-file", help="A YAML file of named strategies.")
SetOpt = typer.Option(
    None, "--set", help="Override any recipe key: section.key=value (repeatable)."
)
ResumeOpt = typer.Option(
    None, "--resume", metavar="[PATH]",
    help="Continue from the latest checkpoint (no value), or from a checkpoint or run dir.",
)
OverwriteRunOpt = typer.Option(False, "--overwrite", help="Replace an existing run.")


# The default of a command's `flags` parameter, which `@recipe_flags` replaces by the options.
GIVEN_FLAGS: Any = None


def _comma_list(text: str) -> list[str] | None:
    """`--target-modules q_proj,v_proj`: one option value for a list key; empty means unset."""
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


@dataclass(frozen=True)
class RecipeFlag:
    """One command-line flag that sets one recipe key.

    Help and type come from the key's field; `note` adds what the field cannot know (a default
    that depends on the command), and `parse` with `type` covers a flag whose value is written
    differently from the key's (a comma-separated list)."""

    key: str  # dotted recipe key: section.field
    short: str | None = None  # e.g. "-m"
    note: str = ""
    parse: Callable[[Any], Any] | None = None  # the option's value -> the key's value
    type: Any = None  # the option's type when `parse` changes it; default: the field's


# The single source of recipe flags: flag name (the option is --name-with-dashes) -> key.
RECIPE_FLAGS: dict[str, RecipeFlag] = {
    # Data
    "data": RecipeFlag("data.train"),
    "dataset": RecipeFlag("data.train", "-d"),
    "eval_dataset": RecipeFlag("data.eval"),
    "format": RecipeFlag("data.format"),
    "chat_template": RecipeFlag("data.chat_template"),
    "seq_len": RecipeFlag("data.seq_len"),
    # Model and tokenizer
    "preset": RecipeFlag("model.preset"),
    "model": RecipeFlag("model.from_pretrained", "-m"),
    "tokenizer": RecipeFlag("tokenizer.path"),
    # Training
    "method": RecipeFlag("train.method", note="`train sft`: lora unless set"),
    "num_epochs": RecipeFlag("train.num_epochs", note="`train sft`: 3 unless --max-steps"),
    "max_steps": RecipeFlag("train.max_steps"),
    "batch_size": RecipeFlag("train.batch_size"),
    "grad_accum": RecipeFlag("train.grad_accum"),
    "lr": RecipeFlag("train.lr"),
    "eval_every": RecipeFlag("train.eval_every"),
    "early_stopping_patience": RecipeFlag("train.early_stopping_patience"),
    "gradient_checkpointing": RecipeFlag("train.gradient_checkpointing"),
    "precision": RecipeFlag("train.precision"),
    # LoRA
    "lora_r": RecipeFlag("lora.r"),
    "lora_alpha": RecipeFlag("lora.alpha"),
    "lora_dropout": RecipeFlag("lora.dropout"),
    "target_modules": RecipeFlag(
        "lora.target_modules", note="comma-separated", parse=_comma_list, type=str
    ),
    "dora": RecipeFlag("lora.use_dora"),
    # Objectives
    "beta": RecipeFlag("preference.beta", note="`train dpo`, `orpo` and `simpo` only"),
    "teacher": RecipeFlag("distill.teacher"),
    "temperature": RecipeFlag("distill.temperature"),
    "alpha": RecipeFlag("distill.alpha"),
    # Output
    "name": RecipeFlag("output.name"),
    "output_dir": RecipeFlag("output.dir"),
}

# The flags of `train` and of `config show`, which shows what `train` would resolve.
TRAIN_FLAGS = (
    "data", "dataset", "preset", "tokenizer", "name", "output_dir", "max_steps", "batch_size", "lr",
    "seq_len",
)


def option_name(name: str) -> str:
    """The long option of table flag `name`: `output_dir` -> `--output-dir`."""
    return "--" + name.replace("_", "-")


def recipe_field(key: str) -> tuple[Any, FieldInfo]:
    """(annotation, pydantic field) of a dotted recipe key; KeyError when there is none."""
    from largeforge.config import Recipe

    section, leaf = key.split(".", 1)
    model = Recipe.model_fields[section].annotation
    assert isinstance(model, type)
    field = model.model_fields[leaf]  # type: ignore[attr-defined]
    return field.annotation, field


def _without_none(annotation: Any) -> Any:
    """`int | None` -> `int`: every flag may be left out, so None is implied."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def option_type(name: str) -> Any:
    """The option's Python type, as typer reads it. A Literal field is taken as `str` so a bad
    value is the recipe's error (naming the key, the flag and the allowed values), as it is
    for the same key set in a file; every option is Optional: unset means "not given"."""
    flag = RECIPE_FLAGS[name]
    annotation = flag.type or _without_none(recipe_field(flag.key)[0])
    if typing.get_origin(annotation) is Literal:
        annotation = str
    return annotation | None


def option_help(name: str) -> str:
    """The field's description as help, then in brackets the allowed values of a Literal field,
    the command-dependent note and whether the option repeats, then the key it sets."""
    flag = RECIPE_FLAGS[name]
    annotation, field = recipe_field(flag.key)
    annotation = _without_none(annotation)
    text = field.description or flag.key
    text = text[:1].upper() + text[1:]
    extras: list[str] = []
    if typing.get_origin(annotation) is Literal:
        extras.append(", ".join(map(str, typing.get_args(annotation))))
    if flag.note:
        extras.append(flag.note)
    if flag.type is None and typing.get_origin(annotation) is list:
        extras.append("repeatable")
    if extras:
        text += f" ({'; '.join(extras)})"
    return f"{text}. Sets {flag.key}."


def _option(name: str, required: bool) -> Any:
    """The `typer.Option` of table flag `name`: a bool key becomes a --x/--no-x pair that stays
    None unless given, so the recipe's value stands."""
    flag = RECIPE_FLAGS[name]
    decls = [option_name(name)]
    if _without_none(recipe_field(flag.key)[0]) is bool:
        decls = [f"{decls[0]}/--no-{decls[0][2:]}"]
    if flag.short:
        decls.append(flag.short)
    return typer.Option(... if required else None, *decls, help=option_help(name))


class GivenFlags(dict[str, Any]):
    """Dotted recipe keys set by flags, with the option that set each in `options` (so an
    error names `--lora-r`, the option typed, not one derived from the key)."""

    def __init__(self) -> None:
        super().__init__()
        self.options: dict[str, str] = {}


def dotted_flags(**given: Any) -> GivenFlags:
    """The table flags that were given (by flag name), as dotted recipe keys; an option left
    out (None, or no values of a repeatable one) is not a flag layer at all."""
    out = GivenFlags()
    for name, value in given.items():
        if value is None or value == []:
            continue
        flag = RECIPE_FLAGS[name]
        value = flag.parse(value) if flag.parse else value
        if value is None:
            continue
        if flag.key in out:  # --data and --dataset
            raise LargeForgeError(
                f"{out.options[flag.key]} and {option_name(name)} both set {flag.key}: give one")
        out[flag.key] = value
        out.options[flag.key] = option_name(name)
    return out


_Command = TypeVar("_Command", bound=Callable[..., Any])


def recipe_flags(*names: str, required: Collection[str] = ()) -> Callable[[_Command], _Command]:
    """Give a command the table's flags `names` (those in `required` must be given).

    The command declares a parameter `flags: dict[str, Any] = GIVEN_FLAGS` where the options
    should appear in its `--help`; that parameter is replaced by one typer option per flag, and
    the command is called with `flags` = the given ones as dotted recipe keys. Typer reads
    parameters from the signature, so the wrapper's `__signature__` is the command's own with
    the options in place of `flags`, and its `__annotations__` (which typer reads too) match.
    """
    unknown = [n for n in (*names, *required) if n not in RECIPE_FLAGS]
    if unknown or not set(required) <= set(names):
        raise ValueError(f"not in RECIPE_FLAGS or not taken: {', '.join(unknown or required)}")

    def decorate(command: _Command) -> _Command:
        signature = inspect.signature(command, eval_str=True)  # types, not "int | None"
        if "flags" not in signature.parameters:
            raise TypeError(f"{command.__name__} needs a `flags = GIVEN_FLAGS` parameter")
        own = [p for p in signature.parameters.values() if p.name != "flags"]
        _check_clashes(command.__name__, own, names)
        added = [
            inspect.Parameter(
                name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=_option(name, name in required), annotation=option_type(name),
            )
            for name in names
        ]
        at = list(signature.parameters).index("flags")
        params = [*own[:at], *added, *own[at:]]

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in names}
            return command(**kwargs, flags=dotted_flags(**given))

        run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        run.__annotations__ = {
            **{p.name: p.annotation for p in params if p.annotation is not p.empty},
            "return": signature.return_annotation,
        }
        return typing.cast(_Command, run)

    return decorate


def _check_clashes(command: str, own: list[inspect.Parameter], names: tuple[str, ...]) -> None:
    """A command's own option with the name or option string of a table flag it takes would
    shadow it (click keeps one): that is a programming error, reported at import."""
    own_opts = {
        decl.split("/")[0]
        for p in own if isinstance(p.default, typer.models.OptionInfo)
        for decl in (p.default.param_decls or ())
    }
    for name in names:
        flag = RECIPE_FLAGS[name]
        if name in {p.name for p in own} or {option_name(name), flag.short} & own_opts:
            raise TypeError(f"{command}: its own option clashes with recipe flag {name!r}")


def resolve(
    config: Path | None,
    strategy: str | None,
    strategy_file: Path | None,
    overrides: list[str] | None,
    flags: dict[str, Any],
) -> ResolvedRecipe:
    """Resolve all layers: defaults < file < environment < `flags` (dotted keys) < --set."""
    from largeforge.config import load_recipe

    return load_recipe(
        config,
        strategy=strategy,
        strategy_file=strategy_file,
        flags=flags,
        flag_options=getattr(flags, "options", None),
        overrides=overrides or [],
    )
