"""`largeforge train` (pretraining or any recipe), `largeforge train sft` and `quickstart`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from largeforge.cli import recipe_options as ro

if TYPE_CHECKING:  # imported when used, so `largeforge --help` does not load torch
    from largeforge.training.state import TrainResult

NprocOpt = typer.Option(
    None, "--nproc", metavar="N",
    help="Train on N processes of this machine: launches torchrun with this same command "
    "(train.distributed auto = DDP; --set train.distributed=fsdp shards the model).",
)


PREFERENCE_COMMANDS = ("dpo", "orpo", "simpo")  # `train NAME`: train.objective NAME
# The recipe flags of `train sft` (and `train dpo`/`orpo`/`simpo`, the same command) and of
# `train distill`, in `--help` order; what each sets, and its help, is `ro.RECIPE_FLAGS`.
SFT_FLAGS = (
    "model", "dataset", "data", "num_epochs", "method", "eval_dataset", "format", "chat_template",
    "lora_r", "lora_alpha", "lora_dropout", "target_modules", "dora", "max_steps", "batch_size",
    "grad_accum", "lr", "seq_len", "eval_every", "early_stopping_patience",
    "gradient_checkpointing", "precision", "beta",
)
DISTILL_FLAGS = (
    "teacher", "dataset", "data", "temperature", "alpha", "method", "max_steps", "num_epochs",
    "batch_size", "lr", "seq_len", "precision",
)


def _launch_if_asked(ctx: typer.Context, nproc: int | None) -> bool:
    """With --nproc N: run this command again on N processes through torchrun, without
    --nproc; True when it did (the caller is then done)."""
    if nproc is None:
        return False
    from largeforge.training.distributed import launch

    launch(nproc, command_args(ctx, leave_out={"nproc"}))
    return True


def command_args(
    ctx: typer.Context, leave_out: frozenset[str] | set[str] = frozenset()
) -> list[str]:
    """The command line that gave `ctx` (the command words and every option given on the
    command line), rebuilt from what click parsed, minus the parameters in `leave_out`."""
    args = ctx.command_path.split()[1:]
    for param in ctx.command.params:
        name = param.name or ""
        # Compared by name: typer vendors its own click, whose enum is not click's.
        source = getattr(ctx.get_parameter_source(name), "name", None)
        if name in leave_out or source != "COMMANDLINE":
            continue
        value = ctx.params[name]
        opts = getattr(param, "opts", [])
        if not opts or param.param_type_name == "argument":
            args += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
            continue
        flag = max(opts, key=len)
        if getattr(param, "is_flag", False):
            secondary = getattr(param, "secondary_opts", [])
            if value:
                args.append(flag)
            elif secondary:
                args.append(max(secondary, key=len))
        elif getattr(param, "multiple", False):
            for item in value:
                args += [flag, str(item)]
        else:
            args += [flag, str(value)]
    return args


@ro.recipe_flags(*ro.TRAIN_FLAGS)
def train_command(
    ctx: typer.Context,
    config: Path | None = ro.ConfigOpt,
    strategy: str | None = ro.StrategyOpt,
    strategy_file: Path | None = ro.StrategyFileOpt,
    overrides: list[str] | None = ro.SetOpt,
    flags: dict[str, Any] = ro.GIVEN_FLAGS,
    resume: str | None = ro.ResumeOpt,
    overwrite: bool = ro.OverwriteRunOpt,
    verify_only: bool = typer.Option(
        False, "--verify-only", help="Check data, tokenizer, model and output; do not train."
    ),
    nproc: int | None = NprocOpt,
) -> None:
    """Pretrain a Llama-style model on text, or train one on instruction and chat data
    (alpaca, sharegpt, messages), as the recipe says; or continue a run. `train sft` fine-tunes
    an existing model."""
    if ctx.invoked_subcommand is not None:
        if nproc is not None:
            from largeforge.errors import LargeForgeError

            raise LargeForgeError(f"put --nproc after `{ctx.invoked_subcommand}`")
        return
    if _launch_if_asked(ctx, nproc):
        return
    resolved = ro.resolve(config, strategy, strategy_file, overrides, flags)
    from largeforge.training.loop import train

    console = Console()
    result = train(
        resolved, resume=resume, overwrite=overwrite, verify_only=verify_only, console=console
    )
    if not result.verified_only:
        print_summary(result, console)


@ro.recipe_flags(*SFT_FLAGS)
def sft_command(
    ctx: typer.Context,
    flags: dict[str, Any] = ro.GIVEN_FLAGS,
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Run directory to write (default runs/sft)."
    ),
    config: Path | None = ro.ConfigOpt,
    overrides: list[str] | None = ro.SetOpt,
    resume: str | None = ro.ResumeOpt,
    overwrite: bool = ro.OverwriteRunOpt,
    verify_only: bool = typer.Option(
        False, "--verify-only", help="Check data, model and output; do not train."
    ),
    nproc: int | None = NprocOpt,
) -> None:
    """Fine-tune an existing causal LM on instruction or chat data: full, LoRA or QLoRA.

    LoRA runs save PEFT adapters (adapter_config.json + adapter_model.safetensors) in final/;
    `largeforge merge` folds them into the base."""
    if _launch_if_asked(ctx, nproc):
        return
    from largeforge.errors import LargeForgeError
    from largeforge.training.sft import resolve_sft_recipe

    objective = ctx.info_name if ctx.info_name in PREFERENCE_COMMANDS else "lm"
    if "preference.beta" in flags and objective == "lm":
        raise LargeForgeError("--beta is for `train dpo`, `train orpo` and `train simpo`")
    if objective != "lm":
        flags = {**flags, "train.objective": objective}
    if output is None and config is None:
        output = Path("runs") / (ctx.info_name or "sft")
    resolved = resolve_sft_recipe(config, flags=flags, overrides=overrides or [], output=output)
    from largeforge.training.loop import train

    console = Console()
    result = train(
        resolved, resume=resume, overwrite=overwrite, verify_only=verify_only, console=console,
        sft=resolved.recipe.train.objective == "lm",
    )
    if not result.verified_only:
        print_summary(result, console)
        adapter = resolved.recipe.train.method != "full"
        if result.model is not None and not result.interrupted and adapter and result.rank == 0:
            console.print(
                f"adapter (PEFT format) in {result.final_dir}; merge it with: largeforge merge "
                f"--adapter {result.final_dir} --output {result.run_dir}-merged"
            )


@ro.recipe_flags(*DISTILL_FLAGS, required={"teacher"})
def distill_command(
    flags: dict[str, Any] = ro.GIVEN_FLAGS,
    student: str = typer.Option(
        ..., "--student", help="The student: a model dir, run or hub id, or a preset name "
        "(tiny, small, medium, base) built with the teacher's tokenizer."
    ),
    output: Path | None = typer.Option(None, "--output", "-o", help="Run directory to write."),
    config: Path | None = ro.ConfigOpt,
    overrides: list[str] | None = ro.SetOpt,
    resume: str | None = ro.ResumeOpt,
    overwrite: bool = ro.OverwriteRunOpt,
    verify_only: bool = typer.Option(
        False, "--verify-only", help="Check data, teacher, student and output; do not train."
    ),
) -> None:
    """Distil a teacher into a student: KL to the teacher's softened distribution (temperature T)
    mixed with cross-entropy by alpha; the two must share a tokenizer."""
    from largeforge.config import load_recipe
    from largeforge.models import PRESETS
    from largeforge.runs import resolve_model_dir

    if student in PRESETS:
        teacher = flags["distill.teacher"]
        model_keys = {"model.preset": student, "tokenizer.path": resolve_model_dir(teacher)}
    else:
        model_keys = {"model.from_pretrained": student}
    out = output or Path("runs") / "distill"
    options = getattr(flags, "options", None)
    flags = {
        **model_keys, "train.objective": "distill", **flags,
        "output.dir": str(out.parent), "output.name": out.name,
    }
    resolved = load_recipe(config, flags=flags, flag_options=options, overrides=overrides or [])
    from largeforge.training.loop import train

    console = Console()
    result = train(resolved, resume=resume, overwrite=overwrite, verify_only=verify_only,
                   console=console)
    if not result.verified_only:
        print_summary(result, console)


def print_summary(result: TrainResult, console: Console) -> None:
    if result.rank != 0:  # under torchrun, rank 0 speaks for every process
        return
    if result.interrupted:
        console.print(f"[bold yellow]stopped[/] at step {result.steps} with a checkpoint in "
                      f"{result.run_dir}; continue it with the same command and --resume")
        return
    console.print(f"[bold green]done[/]: {result.steps} steps in {result.run_dir}")
    if result.best_val_loss is not None:
        console.print(f"best val loss {result.best_val_loss:.4f} -> {result.best_dir}")
    if result.last_val_loss is not None:
        console.print(f"last val loss {result.last_val_loss:.4f}")
    if result.tokens_per_s:
        mfu = 100 * (result.mfu or 0)
        console.print(f"median {result.tokens_per_s:,.0f} tokens/s, MFU {mfu:.1f}%")
    console.print(f"model: {result.final_dir}")


@ro.recipe_flags("output_dir")
def quickstart_command(
    overrides: list[str] | None = ro.SetOpt,
    flags: dict[str, Any] = ro.GIVEN_FLAGS,
) -> None:
    """Train a ~1M-parameter model on Python's own docs (no download), then sample from it."""
    from largeforge.quickstart import run_quickstart

    console = Console()
    console.rule("LargeForge quickstart: a tiny Llama trained on Python's documentation")
    result, samples = run_quickstart(
        overrides, output_dir=flags.get("output.dir"), console=console
    )
    print_summary(result, console)
    console.rule("samples")
    for sample in samples:
        console.print(sample, highlight=False, markup=False)
        console.print()
    console.print(
        f"next: largeforge generate --model {result.run_dir} --prompt 'Return the'"
    )


def register(app: typer.Typer) -> None:
    train_app = typer.Typer(
        name="train", add_completion=False, pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["--help", "-h"]},
    )
    train_app.callback(invoke_without_command=True)(train_command)
    train_app.command("sft")(sft_command)
    train_app.command(
        "dpo", help="Direct preference optimisation of an (SFT) model on chosen/rejected pairs: "
        "sigmoid loss with --beta, --set preference.label_smoothing=..., or "
        "--set preference.loss_type=ipo. LoRA runs use the base with adapters off as the "
        "reference; full runs a frozen copy. Takes every `train sft` option.",
    )(sft_command)
    train_app.command(
        "orpo", help="ORPO: the SFT loss on the chosen completions plus --beta times the "
        "odds-ratio loss; no reference model. Takes every `train sft` option.",
    )(sft_command)
    train_app.command(
        "simpo", help="SimPO: the length-normalised log-likelihood margin of chosen over "
        "rejected, times --beta, must beat --set preference.simpo_gamma=... (default 0.5); no "
        "reference model. Takes every `train sft` option.",
    )(sft_command)
    train_app.command("distill")(distill_command)
    app.add_typer(train_app, name="train")
    app.command("quickstart")(quickstart_command)
