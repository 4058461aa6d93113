"""Entry point of the `largeforge` command.

Every command module registers its commands on `app`. Errors meant for people
(`LargeForgeError`) become one line on stderr and exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback

import typer
from rich.console import Console
from rich.markup import escape

from largeforge.errors import LargeForgeError

app = typer.Typer(
    name="largeforge",
    help="Train, fine-tune, evaluate, export and serve language models on your own hardware.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True, highlight=False)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    if debug:
        os.environ["LARGEFORGE_DEBUG"] = "1"


def _register() -> None:
    # Imported here so `largeforge --help` stays fast and each module stays independent.
    from largeforge.cli import (
        checkpoints_cmd,
        compare_cmd,
        config_cmd,
        dashboard_cmd,
        data_cmd,
        doctor_cmd,
        eval_cmd,
        export_cmd,
        generate_cmd,
        import_cmd,
        infer_cmd,
        merge_cmd,
        router_cmd,
        runs_cmd,
        serve_cmd,
        tokenizer_cmd,
        train_cmd,
    )

    for module in (
        doctor_cmd, config_cmd, data_cmd, tokenizer_cmd, train_cmd, generate_cmd, merge_cmd,
        eval_cmd, compare_cmd, runs_cmd, checkpoints_cmd, export_cmd, import_cmd, serve_cmd,
        infer_cmd, dashboard_cmd,
        router_cmd,  # after serve_cmd: it adds `serve router` to the serve group
    ):
        module.register(app)


_register()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (also used by tests)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("LARGEFORGE_DEBUG") == "1"
    args = _default_resume(args)
    _quiet_library_progress_bars()
    try:
        # With standalone_mode=False, click returns the code of a typer.Exit instead of exiting.
        code = app(args=args, prog_name="largeforge", standalone_mode=False)
    except LargeForgeError as exc:
        if debug:
            traceback.print_exc()
        # The message is text, not markup: paths and library messages may hold "[...]".
        err_console.print("[bold red]error:[/]", escape(str(exc)), soft_wrap=True)
        return exc.exit_code
    except OSError as exc:  # the file system said no: a path, a permission, a full disk
        if debug:
            traceback.print_exc()
        err_console.print("[bold red]error:[/]", escape(describe_os_error(exc)), soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except SystemExit as exc:  # explicit exits
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    except Exception as exc:
        code = _framework_exit(exc)
        if code is None:
            raise
        return code
    return code if isinstance(code, int) else 0


def describe_os_error(exc: OSError) -> str:
    """One line for an operating-system error: what the system said, about which path(s), and
    what usually fixes it."""
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    reason = exc.strerror or type(exc).__name__
    hints = {
        errno.EACCES: "check the permissions of the path or choose another one",
        errno.EPERM: "check the permissions of the path or choose another one",
        errno.ENOSPC: "free some disk space (or write elsewhere) and run the command again",
        errno.ENOTDIR: "a file stands where a directory is expected: choose another path",
        errno.EISDIR: "a directory stands where a file is expected: choose another path",
        errno.EEXIST: "the path exists already: choose another one or remove it",
        errno.EROFS: "the file system is read-only: write elsewhere",
    }
    if exc.errno == errno.EEXIST and exc.filename and os.path.isfile(exc.filename):
        reason, hint = "a file stands where a directory is expected", "choose another path"
    else:
        hint = hints.get(exc.errno or -1)
    text = f"{reason}: {paths}" if paths else f"{reason}"
    return f"{text} ({hint})" if hint else text


def _quiet_library_progress_bars() -> None:
    """transformers draws a bar for every model save and load; our own progress says enough.
    The environment variable (read when transformers is first imported) keeps `--help` from
    importing transformers just to switch them off; a value the user set is kept."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _framework_exit(exc: Exception) -> int | None:
    """The exit code of a usage error, exit or abort raised by the CLI framework, after showing
    it; None for any other exception. Typer >= 0.2x vendors click as `typer._click`, older
    versions raise click's own classes: both are matched by shape, not by import."""
    name = type(exc).__name__
    if name == "Exit":
        return int(getattr(exc, "exit_code", 0))
    if name == "Abort":
        return 1
    show = getattr(exc, "show", None)
    if callable(show) and isinstance(getattr(exc, "exit_code", None), int):
        show()
        return int(exc.exit_code)  # type: ignore[attr-defined]
    return None


def _default_resume(args: list[str]) -> list[str]:
    """`--resume` with no value means `--resume latest` (click options cannot take an
    optional value, and typer dropped `flag_value`)."""
    out: list[str] = []
    for index, arg in enumerate(args):
        out.append(arg)
        following = args[index + 1] if index + 1 < len(args) else None
        if arg == "--resume" and (following is None or following.startswith("-")):
            out.append("latest")
    return out


if __name__ == "__main__":
    sys.exit(main())
