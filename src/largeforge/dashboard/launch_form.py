"""The launch form, built from the recipe schema and the CLI's own flag tables, so it never
drifts from the commands: each command's fields are the recipe flags that command takes
(`cli.train_cmd`), each field's type, default, choices and help are those of the recipe key's
pydantic field (`cli.recipe_options`), and a launch is the very command line the CLI would run.

Checking happens in two stages. The values are first parsed as the options would be and the
recipe resolved as the command resolves it (`config.load_recipe`), which names the bad flag at
once; then the command itself runs with `--verify-only`, exactly as a user would, and its one
`error:` line is put beside the field whose option it names. Only a form that passes both
starts anything.
"""

from __future__ import annotations

import re
import subprocess
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from largeforge.cli import recipe_options as ro
from largeforge.cli.train_cmd import DISTILL_FLAGS, SFT_FLAGS
from largeforge.errors import LargeForgeError

# command -> (the words after `largeforge`, the recipe flags its form shows)
COMMANDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "train": (("train",), ro.TRAIN_FLAGS),
    "sft": (("train", "sft"), SFT_FLAGS),
    "dpo": (("train", "dpo"), SFT_FLAGS),
    "orpo": (("train", "orpo"), SFT_FLAGS),
    "distill": (("train", "distill"), DISTILL_FLAGS),
}
COMMAND_TITLES = {
    "train": "Pretrain (train)", "sft": "Fine-tune (train sft)", "dpo": "DPO (train dpo)",
    "orpo": "ORPO (train orpo)", "distill": "Distil (train distill)",
}
# Fields every command's form has besides its recipe flags (not recipe keys: the run's name and
# where it goes, the student of a distillation, and free `--set` lines).
NAME_FIELD, SETS_FIELD, STUDENT_FIELD = "run_name", "set", "student"
FORM_ERROR = "_form"  # errors that name no field
# Labels where the flag's own name reads poorly; any other flag is its name, capitalised.
LABELS = {
    "lr": "Learning rate", "seq_len": "Sequence length", "num_epochs": "Epochs",
    "eval_dataset": "Eval dataset", "lora_r": "LoRA rank", "lora_alpha": "LoRA alpha",
    "lora_dropout": "LoRA dropout", "dora": "DoRA", "grad_accum": "Gradient accumulation",
    "eval_every": "Evaluate every", "early_stopping_patience": "Early stopping patience",
    "beta": "Beta", "alpha": "KD alpha", "temperature": "KD temperature",
}


@dataclass(frozen=True)
class FormField:
    name: str  # the flag name (`lora_r`) or one of the extra fields
    label: str
    kind: str  # text, int, float, bool, choice, list
    help: str
    default: Any = None
    choices: tuple[str, ...] = ()
    required: bool = False
    option: str = ""  # the command-line option it becomes


def _kind(annotation: Any) -> tuple[str, tuple[str, ...]]:
    base = ro._without_none(annotation)
    if typing.get_origin(base) is Literal:
        return "choice", tuple(str(a) for a in typing.get_args(base))
    if base is bool:
        return "bool", ()
    if base is int:
        return "int", ()
    if base is float:
        return "float", ()
    if typing.get_origin(base) is list:
        return "list", ()
    return "text", ()


def form_fields(command: str) -> list[FormField]:
    """The form of `command`: its recipe flags, in the CLI's order, then the run's name."""
    words, names = COMMANDS[command]
    fields: list[FormField] = []
    if command == "distill":
        fields.append(FormField(STUDENT_FIELD, "Student", "text", "The student: a model dir, "
                                "run or preset name (tiny, small, medium, base).",
                                required=True, option="--student"))
    for name in names:
        if name in ("name", "output_dir"):
            continue  # the run's name and place are the form's own field
        flag = ro.RECIPE_FLAGS[name]
        annotation, info = ro.recipe_field(flag.key)
        kind, choices = _kind(flag.type or annotation)
        default = info.default if not callable(info.default) and info.default is not None \
            and str(info.default) != "PydanticUndefined" else None
        fields.append(FormField(
            name, LABELS.get(name, name.replace("_", " ").capitalize()), kind,
            ro.option_help(name),
            default=default, choices=choices,
            required=command == "distill" and name == "teacher", option=ro.option_name(name),
        ))
    fields.append(FormField(NAME_FIELD, "Run name", "text", "The run directory's name, under "
                            "the dashboard's runs directory.", required=True,
                            option="--name" if command == "train" else "--output"))
    fields.append(FormField(SETS_FIELD, "More settings", "lines", "Any recipe key, one "
                            "section.key=value per line (as --set).", option="--set"))
    return fields


@dataclass
class Launch:
    command: str
    argv: list[str]  # after `largeforge`
    run_dir: Path
    errors: dict[str, str] = field(default_factory=dict)
    values: dict[str, str] = field(default_factory=dict)  # as the form gave them


_FALSE = {"", "0", "false", "no", "off"}


def _parse(f: FormField, raw: str) -> Any:
    """A form value as its option would parse it; ValueError with a message when it cannot."""
    if f.kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{f.option} takes a whole number, not {raw!r}") from None
    if f.kind == "float":
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{f.option} takes a number, not {raw!r}") from None
    if f.kind == "bool":
        return raw.strip().lower() not in _FALSE
    if f.kind == "choice" and raw not in f.choices:
        raise ValueError(f"{f.option} takes one of {', '.join(f.choices)}, not {raw!r}")
    return raw


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def build_launch(command: str, values: dict[str, str], runs_dir: Path) -> Launch:
    """The command line of a filled form, or the errors by field; resolves the recipe as the
    command does (no torch: the slow checks are `verify`'s)."""
    if command not in COMMANDS:
        raise LargeForgeError(f"unknown command {command!r}; one of {', '.join(COMMANDS)}")
    words, _ = COMMANDS[command]
    fields = form_fields(command)
    errors: dict[str, str] = {}
    given: dict[str, Any] = {}
    argv: list[str] = list(words)
    for f in fields:
        raw = (values.get(f.name) or "").strip()
        if f.name in (NAME_FIELD, SETS_FIELD, STUDENT_FIELD):
            continue
        if not raw or (f.kind == "bool" and raw.lower() in _FALSE and f.default is not True):
            if f.required:
                errors[f.name] = f"{f.option} is required"
            continue
        try:
            value = _parse(f, raw)
        except ValueError as exc:
            errors[f.name] = str(exc)
            continue
        given[f.name] = [v.strip() for v in raw.split(",") if v.strip()] \
            if f.kind == "list" and f.name != "target_modules" else value
        argv += _option_args(f, raw, value)
    name = (values.get(NAME_FIELD) or "").strip()
    if not _SAFE_NAME.match(name):
        errors[NAME_FIELD] = ("a run name is letters, digits, '.', '_' and '-' (up to 100), "
                              "starting with a letter or digit")
    run_dir = (runs_dir / name).resolve() if name else runs_dir.resolve()
    argv += _place_args(command, run_dir)
    student = (values.get(STUDENT_FIELD) or "").strip()
    if command == "distill":
        if not student:
            errors[STUDENT_FIELD] = "--student is required"
        argv += ["--student", student]
    sets = [line.strip() for line in (values.get(SETS_FIELD) or "").splitlines() if line.strip()]
    for line in sets:
        if "=" not in line:
            errors[SETS_FIELD] = f"{line!r} is not section.key=value"
        argv += ["--set", line]
    if not errors:
        _resolve(command, given, sets, errors, values)
    return Launch(command, argv, run_dir, errors, values)


def _option_args(f: FormField, raw: str, value: Any) -> list[str]:
    if f.kind == "bool":
        return [f.option] if value else [f"--no-{f.option[2:]}"]
    if f.kind == "list" and f.name != "target_modules":
        return [arg for item in raw.split(",") if item.strip() for arg in (f.option, item.strip())]
    return [f.option, raw]


def _place_args(command: str, run_dir: Path) -> list[str]:
    if command == "train":
        return ["--output-dir", str(run_dir.parent), "--name", run_dir.name]
    return ["--output", str(run_dir)]


def _resolve(command: str, given: dict[str, Any], sets: list[str],
             errors: dict[str, str], values: dict[str, str]) -> None:
    """Resolve the recipe from the given flags as the command would; an error naming a flag
    goes beside that field."""
    from largeforge.config import load_recipe

    try:
        flags = ro.dotted_flags(**given)
        if command in ("dpo", "orpo", "distill"):  # what the command itself adds
            flags["train.objective"] = command
        load_recipe(None, flags=flags, flag_options=flags.options, overrides=sets)
    except LargeForgeError as exc:
        place_error(str(exc), command, errors, values)


def place_error(message: str, command: str, errors: dict[str, str],
                values: dict[str, str] | None = None) -> None:
    """Put `message` beside the field whose option (or recipe key) it names, else beside the
    field whose value it quotes (a data file not found), else on the form."""
    fields = form_fields(command)
    for f in fields:
        key = ro.RECIPE_FLAGS[f.name].key if f.name in ro.RECIPE_FLAGS else None
        if re.search(re.escape(f.option) + r"(?![\w-])", message) or (key and key in message):
            errors.setdefault(f.name, message)
            return
    for f in fields:
        raw = ((values or {}).get(f.name) or "").strip()
        if len(raw) >= 3 and f.kind not in ("lines",) and raw in message:
            errors.setdefault(f.name, message)
            return
    if "output" in message or "run directory" in message:
        errors.setdefault(NAME_FIELD, message)
        return
    errors.setdefault(FORM_ERROR, message)


def verify(launch: Launch, python_argv: list[str], cwd: Path, timeout: float = 600,
           env: dict[str, str] | None = None) -> None:
    """Run the command with `--verify-only` (the CLI's own checks of data, tokenizer, model
    and output); its error line goes beside the field it names."""
    argv = [*python_argv, *launch.argv, "--verify-only"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                              stdin=subprocess.DEVNULL, env=env)
    except subprocess.TimeoutExpired:
        launch.errors[FORM_ERROR] = f"the check (--verify-only) took over {timeout:.0f} s"
        return
    if proc.returncode != 0:
        message = error_line(proc.stderr) or (
            proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        place_error(message, launch.command, launch.errors, launch.values)


def error_line(stderr: str) -> str | None:
    """The message of a command's last `error:` line (the CLI's one-line refusal)."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    return lines[-1][len("error:"):].strip() if lines else None
