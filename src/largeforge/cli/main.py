"""Entry point of the `largeforge` command.

Every command module registers its commands on `app`. Errors meant for people
(`LargeForgeError`) become one line on stderr and exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer
from rich.console import Console

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
    from largeforge.cli import config_cmd, doctor_cmd, generate_cmd, tokenizer_cmd, train_cmd

    for module in (doctor_cmd, config_cmd, tokenizer_cmd, train_cmd, generate_cmd):
        module.register(app)


_register()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (also used by tests)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("LARGEFORGE_DEBUG") == "1"
    try:
        app(args=args, prog_name="largeforge", standalone_mode=False)
    except LargeForgeError as exc:
        if debug:
            traceback.print_exc()
        err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except SystemExit as exc:  # typer/click usage errors and explicit exits
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    except Exception as exc:  # click usage errors come through as ClickException
        import click

        if isinstance(exc, click.exceptions.Exit):
            return exc.exit_code
        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
