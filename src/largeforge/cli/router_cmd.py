"""`largeforge expert add | list | remove`, `largeforge router train | eval` and
`largeforge serve router`: experts in the registry, the routing classifier, the router server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

expert_app = typer.Typer(help="Experts the router serves, kept in the registry.",
                         no_args_is_help=True)
router_app = typer.Typer(help="Train and check the router's routing classifier.",
                         no_args_is_help=True)

RegistryOpt = typer.Option(
    None, "--registry", help="Registry database (default: $LARGEFORGE_REGISTRY, else "
    "~/.largeforge/registry.db).",
)


def _console() -> Console:
    probe = Console()
    return Console(highlight=False, width=None if probe.is_terminal else 200)


@expert_app.command("add")
def expert_add(
    name: str = typer.Option(..., "--name", help="The expert's name (letters, digits, . _ -)."),
    model: str | None = typer.Option(
        None, "--model", help="Model directory, run directory or hub id the router starts "
        "`serve inference` for."),
    keywords: str | None = typer.Option(
        None, "--keywords", help="Comma-separated words or phrases routed to this expert "
        "(a trailing * matches a prefix)."),
    url: list[str] = typer.Option(
        [], "--url", help="Base URL of a running `serve inference` server of this expert "
        "(repeatable)."),
    replicas: int | None = typer.Option(
        None, "--replicas", help="Servers the router starts for --model (default: 1 without "
        "--url, 0 with it)."),
    description: str | None = typer.Option(None, "--description", help="What it is good at."),
    registry: Path | None = RegistryOpt,
) -> None:
    """Register an expert (a model and/or the URLs of its servers)."""
    from largeforge.serving.experts import add_expert

    record = add_expert(name, model=model, keywords=keywords, urls=url, replicas=replicas,
                        description=description, registry=registry)
    parts = [f"{record.replicas} server(s) of {record.model}"] if record.replicas else []
    where = ", ".join([*parts, *record.urls])
    _console().print(f"added expert {record.name}: {where}; keywords: "
                     f"{', '.join(record.keywords) or 'none'}")


@expert_app.command("list")
def expert_list(
    registry: Path | None = RegistryOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Every registered expert."""
    from largeforge.runs import format_time
    from largeforge.serving.experts import open_registry

    reg = open_registry(registry)
    records = reg.list_experts()
    if as_json:
        typer.echo(json.dumps([r.to_json() for r in records], indent=2))
        return
    console = _console()
    if not records:
        console.print(f"no experts in {reg.path}")
        return
    table = Table(title=f"experts ({reg.path})")
    for column in ("name", "model", "replicas", "urls", "keywords", "description", "created"):
        table.add_column(column, overflow="fold")
    for r in records:
        table.add_row(r.name, r.model or "", str(r.replicas), "\n".join(r.urls),
                      ", ".join(r.keywords), r.description or "", format_time(r.created))
    console.print(table)


@expert_app.command("remove")
def expert_remove(
    name: str = typer.Argument(..., help="The expert's name."),
    registry: Path | None = RegistryOpt,
) -> None:
    """Forget an expert (its model files are left alone)."""
    from largeforge.serving.experts import remove_expert

    record = remove_expert(name, registry=registry)
    _console().print(f"removed expert {record.name}")


@router_app.command("train")
def router_train(
    data: Path = typer.Option(..., "--data", help="JSONL of {\"text\": ..., \"label\": "
                              "EXPERT} records."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the classifier."),
    test_fraction: float = typer.Option(
        0.2, "--test-fraction", help="Share of prompts held out (stratified) to measure "
        "accuracy; 0 trains on all."),
    seed: int = typer.Option(0, "--seed", help="Seed of the held-out split."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output."),
) -> None:
    """Train the routing classifier (TF-IDF + logistic regression) on labelled prompts."""
    from largeforge.serving.routing import train_router_classifier

    result = train_router_classifier(data, output, test_fraction=test_fraction, seed=seed,
                                     overwrite=overwrite)
    console = _console()
    counts = ", ".join(f"{label} {n}" for label, n in result.counts.items())
    console.print(f"trained on {result.n_train} prompts ({counts}); saved to {result.output}")
    if result.heldout_accuracy is not None:
        console.print(f"held-out accuracy: {result.heldout_accuracy:.4f} "
                      f"({result.n_test} prompts)")


@router_app.command("eval")
def router_eval(
    config: Path = typer.Option(..., "--config", help="router.yaml: its routing is measured."),
    data: Path = typer.Option(..., "--data", help="JSONL of {\"text\", \"label\"} records."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Routing accuracy of a router.yaml on labelled prompts (no server is started)."""
    from largeforge.serving.router_config import load_router_config
    from largeforge.serving.router_state import build_router
    from largeforge.serving.routing import read_labeled_prompts, routing_accuracy

    cfg = load_router_config(config)
    records = read_labeled_prompts(data)
    accuracy = routing_accuracy(build_router(cfg), records)
    result: dict[str, Any] = {"method": cfg.routing.method, "accuracy": accuracy,
                              "prompts": len(records)}
    if as_json:
        typer.echo(json.dumps(result))
        return
    _console().print(f"{cfg.routing.method} routing accuracy: {accuracy:.4f} "
                     f"({len(records)} prompts)")


def serve_router_command(
    config: Path = typer.Option(..., "--config", help="router.yaml (experts, routing, "
                                "fallback, health checks, breaker)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    api_key: list[str] = typer.Option(
        [], "--api-key", help="Accepted API key (repeatable; also $LARGEFORGE_API_KEYS)."),
    api_key_file: Path | None = typer.Option(None, "--api-key-file",
                                             help="File of API keys, one per line."),
    rate_limit: float | None = typer.Option(
        None, "--rate-limit", help="Requests per minute per key (per address without keys)."),
    log_dir: Path | None = typer.Option(
        None, "--log-dir", help="Where the logs of the servers the router starts go "
        "(default: a new temporary directory)."),
) -> None:
    """Serve the OpenAI API in front of experts: route, balance, retry, fall back."""
    from largeforge.serving.auth import load_api_keys
    from largeforge.serving.router_app import serve_router

    keys = load_api_keys(api_key, api_key_file)
    console = Console(stderr=True, highlight=False)

    def ready(cfg: Any, local: Any) -> None:
        console.print(f"router: {len(cfg.experts)} experts ({', '.join(cfg.names)}), routing "
                      f"by {cfg.routing.method}, fallback {cfg.fallback}"
                      + (f"; expert server logs in {local.log_dir}" if local.processes else ""),
                      soft_wrap=True)

    serve_router(config, host=host, port=port, api_keys=keys, rate_limit=rate_limit,
                 log_dir=log_dir, log_level="warning", on_ready=ready)


def register(app: typer.Typer) -> None:
    from largeforge.cli.serve_cmd import serve_app

    app.add_typer(expert_app, name="expert")
    app.add_typer(router_app, name="router")
    serve_app.command("router")(serve_router_command)
