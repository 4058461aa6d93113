"""(being written) `largeforge serve inference | router`."""

import typer

serve_app = typer.Typer(help="Serve models over an OpenAI-compatible HTTP API.",
                        no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(serve_app, name="serve")
