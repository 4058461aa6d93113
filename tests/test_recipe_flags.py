"""Recipe flags are declared once, in `recipe_options.RECIPE_FLAGS`: every command that takes them
(`train`, `train sft`/`dpo`/`orpo`, `train distill`, `config show`, `quickstart`) gets the same
option, help and recipe key from that table, and no command declares a recipe flag of its own.

Cheap: nothing is trained; the flags are resolved through `config show` and a command of the
test's own built with the same decorator."""

from __future__ import annotations

import json
import os
import typing
from collections.abc import Iterator
from typing import Any

import typer
from typer.testing import CliRunner

from largeforge.cli import recipe_options as ro
from largeforge.cli.main import app

# Options that are not recipe keys, and so are declared by their commands.
NOT_RECIPE_FLAGS = {
    "ctx", "config", "strategy", "strategy_file", "overrides", "resume", "overwrite",
    "verify_only", "nproc", "fmt", "sft", "output", "student", "help",
}
COMMANDS = (
    ("train",), ("train", "sft"), ("train", "dpo"), ("train", "orpo"), ("train", "simpo"),
    ("train", "distill"),
    ("config", "show"), ("quickstart",),
)
# flag name -> (the value on the command line, the value the recipe key gets); bool flags are
# given without a value. Every table flag needs one, so a new flag is tested in every command.
SAMPLES: dict[str, tuple[str | None, Any]] = {
    "data": ("a.jsonl", ["a.jsonl"]),
    "dataset": ("b.jsonl", ["b.jsonl"]),
    "eval_dataset": ("c.jsonl", ["c.jsonl"]),
    "format": ("alpaca", "alpaca"),
    "chat_template": ("chatml", "chatml"),
    "seq_len": ("64", 64),
    "preset": ("small", "small"),
    "model": ("some-model-dir", "some-model-dir"),
    "tokenizer": ("some-tokenizer-dir", "some-tokenizer-dir"),
    "method": ("full", "full"),
    "num_epochs": ("2.5", 2.5),
    "max_steps": ("7", 7),
    "batch_size": ("3", 3),
    "grad_accum": ("2", 2),
    "lr": ("0.5", 0.5),
    "eval_every": ("5", 5),
    "early_stopping_patience": ("2", 2),
    "gradient_checkpointing": (None, True),
    "precision": ("fp32", "fp32"),
    "lora_r": ("4", 4),
    "lora_alpha": ("8", 8.0),
    "lora_dropout": ("0.2", 0.2),
    "target_modules": ("q_proj, v_proj", ["q_proj", "v_proj"]),
    "dora": (None, True),
    "beta": ("0.3", 0.3),
    "teacher": ("teacher-dir", "teacher-dir"),
    "temperature": ("2", 2.0),
    "alpha": ("0.25", 0.25),
    "name": ("a-run", "a-run"),
    "output_dir": ("some-runs", "some-runs"),
}


def commands() -> Iterator[tuple[str, Any]]:
    """("train sft", its click command) for every command that reads a recipe."""
    root = typer.main.get_command(app)
    for path in COMMANDS:
        command: Any = root
        for word in path:
            command = command.commands[word]
        yield " ".join(path), command


def recipe_options(command: Any) -> dict[str, Any]:
    """Parameter name -> click option, for the command's options that are table flags."""
    return {p.name: p for p in command.params if p.name in ro.RECIPE_FLAGS}


def test_every_table_key_is_a_described_recipe_field_of_the_flags_type():
    assert set(SAMPLES) == set(ro.RECIPE_FLAGS)
    for name, flag in ro.RECIPE_FLAGS.items():
        annotation, field = ro.recipe_field(flag.key)  # KeyError: not in the Recipe model
        assert field.description, f"{flag.key} has no Field(description=...) for --help"
        option = typing.get_args(ro.option_type(name))[0]
        if flag.type is not None:
            assert option is flag.type and flag.parse is not None
        elif typing.get_origin(ro._without_none(annotation)) is typing.Literal:
            assert option is str  # validated by the recipe, whose error names the flag
        else:
            assert option == ro._without_none(annotation), name


def test_every_command_takes_its_recipe_flags_from_the_table():
    seen: set[str] = set()
    for path, command in commands():
        for param in command.params:
            assert param.name in ro.RECIPE_FLAGS or param.name in NOT_RECIPE_FLAGS, (
                f"`{path}` declares --{param.name} itself: is it a recipe key? Then add it to "
                "RECIPE_FLAGS and to the command's @recipe_flags"
            )
        for name, option in recipe_options(command).items():
            flag = ro.RECIPE_FLAGS[name]
            assert option.opts == [ro.option_name(name), *([flag.short] if flag.short else [])]
            assert option.help == ro.option_help(name)
            assert option.default is None and option.required == (name == "teacher")
            seen.add(name)
    assert seen == set(ro.RECIPE_FLAGS), "a table flag that no command takes"


def test_config_show_takes_the_flags_of_train_and_dpo_those_of_sft():
    found = {path: set(recipe_options(command)) for path, command in commands()}
    assert found["config show"] == found["train"] == set(ro.TRAIN_FLAGS)
    assert found["train sft"] == found["train dpo"] == found["train orpo"] == found["train simpo"]


def command_line(names: list[str]) -> list[str]:
    """Every flag of `names` with its sample value."""
    args: list[str] = []
    for name in names:
        value = SAMPLES[name][0]
        args += [ro.option_name(name)] if value is None else [ro.option_name(name), value]
    return args


def test_every_flag_lands_on_its_recipe_key() -> None:
    """The table's decorator on a command of this test's own: each flag given on the command
    line reaches the command as its dotted recipe key, parsed (the real commands use the same
    decorator; the test above checks that)."""
    probe = typer.Typer()
    seen: list[dict[str, Any]] = []

    @probe.command()
    @ro.recipe_flags(*ro.RECIPE_FLAGS, required=("teacher",))
    def run(flags: dict[str, Any] = ro.GIVEN_FLAGS) -> None:
        seen.append(flags)

    # --data and --dataset both set data.train: one at a time, and both together are refused
    for alias in ("data", "dataset"):
        names = [n for n in ro.RECIPE_FLAGS if n != ("dataset" if alias == "data" else "data")]
        result = CliRunner().invoke(probe, command_line(names))
        assert result.exit_code == 0, (result.output, result.exception)
        given = seen.pop()
        for name in names:
            assert given[ro.RECIPE_FLAGS[name].key] == SAMPLES[name][1], name
        assert given.options["data.train"] == f"--{alias}"
    result = CliRunner().invoke(probe, command_line(list(ro.RECIPE_FLAGS)))
    assert "--data and --dataset both set data.train: give one" in str(result.exception)


def show(*args: str) -> dict[str, tuple[Any, str]]:
    """`config show --format json` as key -> (value, where it came from)."""
    result = CliRunner().invoke(app, ["config", "show", "--format", "json", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return {row["key"]: (row["value"], row["source"]) for row in json.loads(result.output)}


def test_train_flags_set_their_keys_through_the_recipe_layers(monkeypatch) -> None:
    for name in [n for n in os.environ if n.startswith("LARGEFORGE_")]:
        monkeypatch.delenv(name)
    names = [n for n in ro.TRAIN_FLAGS if n != "dataset"]  # it sets data.train, as --data does
    rows = show(*command_line(names))
    for name in names:
        key = ro.RECIPE_FLAGS[name].key
        assert rows[key][0] == SAMPLES[name][1] and rows[key][1].startswith("flag --"), name
    # --set beats a flag; a bad value is the recipe's error, naming the flag
    assert show("--lr", "0.5", "--set", "train.lr=0.25")["train.lr"] == (
        0.25, "--set train.lr=0.25")
    result = CliRunner().invoke(app, ["config", "show", "--batch-size", "0"])
    assert "train.batch_size (from flag --batch-size)" in str(result.exception)
    rows = show("--sft", "--lr", "0.5")
    assert rows["train.lr"] == (0.5, "flag --lr") and rows["train.method"][1] == (
        "train sft default")


def test_beta_is_refused_outside_preference_training() -> None:
    refused = CliRunner().invoke(app, ["train", "sft", "-m", "m", "-d", "d", "--beta", "0.2"])
    assert "--beta is for `train dpo`" in str(refused.exception)
