"""Experts: named models the router sends requests to, kept in the SQLite registry.

An expert is a model directory the router starts `replicas` `largeforge serve inference`
servers for, and/or the base URLs of servers already running (`http://host:port`). Requests reach
it by its keywords (keyword routing), by a classifier's label (classifier routing) or by naming it
as the request's `model`.

    from largeforge.serving.experts import add_expert
    add_expert("coding", model="runs/coder", keywords="code,python")
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

from largeforge.errors import LargeForgeError
from largeforge.runs import ExpertRecord, Registry

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise LargeForgeError(
            f"expert name {name!r} is not valid: use letters, digits, '.', '_' or '-' (at most "
            "64 characters, starting with a letter or digit)"
        )
    return name


def parse_keywords(keywords: str | Iterable[str] | None) -> tuple[str, ...]:
    """"code, Python,code" or a list -> ("code", "python"): lower case, stripped, first
    occurrence kept, empty items dropped."""
    if keywords is None:
        return ()
    items = keywords.split(",") if isinstance(keywords, str) else list(keywords)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise LargeForgeError(f"keyword {item!r} must be text")
        word = " ".join(item.lower().split())
        if word and word not in out:
            out.append(word)
    return tuple(out)


def normalize_url(url: str) -> str:
    """A server's base URL: `http(s)://host:port[/prefix]`, without a trailing `/` or `/v1`."""
    text = url.strip().rstrip("/")
    if text.endswith("/v1"):
        text = text[: -len("/v1")]
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LargeForgeError(
            f"replica URL {url!r} is not valid: expected http://HOST:PORT (the base URL of a "
            "`largeforge serve inference` server)"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise LargeForgeError(f"replica URL {url!r} has an invalid port") from None
    return text


def check_model(model: str | Path) -> str:
    """A local model or run directory (made absolute) or a hub id; a missing path is an error."""
    from largeforge.runs import resolve_model_dir

    path = Path(model).expanduser()
    if path.exists():
        resolve_model_dir(path)  # a directory that is neither a model nor a run is an error
        return str(path.resolve())
    return resolve_model_dir(str(model))  # a hub id, else "not found: no such directory"


def make_expert(
    name: str,
    *,
    model: str | Path | None = None,
    keywords: str | Iterable[str] | None = None,
    urls: Iterable[str] = (),
    replicas: int | None = None,
    description: str | None = None,
) -> ExpertRecord:
    """A validated expert. `replicas` (servers the router starts for `model`) defaults to 1
    when no URL is given, else 0 (the URLs serve the model)."""
    check_name(name)
    url_list = tuple(dict.fromkeys(normalize_url(u) for u in urls))
    if model is None and not url_list:
        raise LargeForgeError(
            f"expert {name!r} needs a model directory (--model) or the URL of a running server "
            "(--url)"
        )
    if replicas is None:
        replicas = 0 if url_list else 1
    if replicas < 0:
        raise LargeForgeError(f"expert {name!r}: replicas must be 0 or more, not {replicas}")
    if replicas > 0 and model is None:
        raise LargeForgeError(
            f"expert {name!r}: {replicas} replica(s) to start, but no model to start them from"
        )
    if replicas == 0 and not url_list:
        raise LargeForgeError(f"expert {name!r} has no replica: give --url or replicas >= 1")
    return ExpertRecord(
        name=name, model=check_model(model) if model is not None else None,
        keywords=parse_keywords(keywords), urls=url_list, replicas=replicas,
        description=description or None,
    )


def add_expert(
    name: str,
    *,
    model: str | Path | None = None,
    keywords: str | Iterable[str] | None = None,
    urls: Iterable[str] = (),
    replicas: int | None = None,
    description: str | None = None,
    registry: Registry | str | Path | None = None,
) -> ExpertRecord:
    """Validate and store an expert; its name must be new."""
    record = make_expert(name, model=model, keywords=keywords, urls=urls, replicas=replicas,
                         description=description)
    return open_registry(registry, create=True).add_expert(record)


def list_experts(registry: Registry | str | Path | None = None) -> list[ExpertRecord]:
    return open_registry(registry).list_experts()


def get_expert(name: str, registry: Registry | str | Path | None = None) -> ExpertRecord:
    return open_registry(registry).get_expert(name)


def remove_expert(name: str, registry: Registry | str | Path | None = None) -> ExpertRecord:
    return open_registry(registry).remove_expert(name)


def open_registry(registry: Registry | str | Path | None = None, *,
                  create: bool = False) -> Registry:
    """The registry given, or the one at a path, or the default one."""
    if isinstance(registry, Registry):
        return registry
    return Registry(registry, create=create)
