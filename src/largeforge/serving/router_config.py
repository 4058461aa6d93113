"""router.yaml: which experts the router serves, how it picks one, and how it guards them.

    experts:
      - coding                       # an expert from the registry (`largeforge expert add`)
      - name: stories                # inline: a model the router starts 2 servers for
        model: runs/stories          # relative paths are relative to this file
        replicas: 2
        keywords: [story, once upon a time]
      - name: general
        urls: [http://127.0.0.1:8001, http://127.0.0.1:8002]   # servers already running
        api_key: sk-...              # the key those servers want (optional)
    fallback: general                # answers when the chosen expert cannot (default: the first)
    routing:
      method: classifier             # keywords (default) | classifier
      classifier: routers/clf        # a `largeforge router train` output directory
      min_confidence: 0.0            # below it, the request goes to `default`
      default: general               # where unmatched requests go (default: the fallback)
    health: {interval: 2.0, timeout: 2.0}
    breaker: {failure_threshold: 3, cooldown: 10.0}
    upstream: {timeout: 600, connect_timeout: 2.0, startup_timeout: 300}
    registry: ~/.largeforge/registry.db   # default: $LARGEFORGE_REGISTRY, else that path

An entry naming a registered expert may also set some of its fields (keywords, urls...) for
this router only. Unknown keys are errors naming the key and the file.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from largeforge.errors import LargeForgeError
from largeforge.runs import ExpertRecord, Registry
from largeforge.serving.experts import make_expert
from largeforge.text_files import read_yaml_mapping


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExpertEntry(_Section):
    name: str
    model: str | None = None
    urls: list[str] | None = None
    replicas: int | None = Field(None, ge=0)
    keywords: list[str] | str | None = None
    description: str | None = None
    api_key: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    def inline_fields(self) -> set[str]:
        return {k for k in ("model", "urls", "replicas", "keywords", "description")
                if getattr(self, k) is not None}


class RoutingSection(_Section):
    method: Literal["keywords", "classifier"] = "keywords"
    classifier: str | None = None
    min_confidence: float = Field(0.0, ge=0.0, le=1.0)
    default: str | None = None


class HealthSection(_Section):
    interval: float = Field(2.0, gt=0)
    timeout: float = Field(2.0, gt=0)


class BreakerSection(_Section):
    failure_threshold: int = Field(3, ge=1)
    cooldown: float = Field(10.0, ge=0)


class UpstreamSection(_Section):
    timeout: float = Field(600.0, gt=0)
    connect_timeout: float = Field(2.0, gt=0)
    startup_timeout: float = Field(300.0, gt=0)


class RouterFile(_Section):
    """The YAML file as written."""

    experts: list[ExpertEntry] = Field(min_length=1)
    fallback: str | None = None
    routing: RoutingSection = RoutingSection()
    health: HealthSection = HealthSection()
    breaker: BreakerSection = BreakerSection()
    upstream: UpstreamSection = UpstreamSection()
    registry: str | None = None


@dataclass(frozen=True)
class ExpertSpec:
    """An expert as the router serves it: the registry's record (or the inline one) plus the
    key its servers want."""

    record: ExpertRecord
    api_key: str | None = None

    @property
    def name(self) -> str:
        return self.record.name


@dataclass(frozen=True)
class RouterConfig:
    """A validated router.yaml: experts resolved, paths made absolute."""

    experts: list[ExpertSpec]
    fallback: str
    routing: RoutingSection
    health: HealthSection = field(default_factory=HealthSection)
    breaker: BreakerSection = field(default_factory=BreakerSection)
    upstream: UpstreamSection = field(default_factory=UpstreamSection)
    source: Path | None = None

    def expert(self, name: str) -> ExpertSpec:
        for spec in self.experts:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.experts]


def load_router_config(path: str | Path, *, registry: Registry | None = None) -> RouterConfig:
    """Read, validate and resolve a router.yaml (see the module docstring)."""
    path = Path(path)
    raw = read_yaml_mapping(path, "router config")
    try:
        parsed = RouterFile.model_validate(raw)
    except ValidationError as exc:
        raise LargeForgeError(_describe(exc, path)) from None
    return resolve_router_config(parsed, base=path.parent, registry=registry, source=path)


def resolve_router_config(
    parsed: RouterFile, *, base: Path = Path("."), registry: Registry | None = None,
    source: Path | None = None,
) -> RouterConfig:
    where = str(source) if source else "the router config"
    names = [e.name for e in parsed.experts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise LargeForgeError(f"{where}: expert {', '.join(duplicates)} is listed twice")
    if registry is None:
        reg_path = _path(parsed.registry, base) if parsed.registry else None
        registry = Registry(reg_path, create=False)
    experts = [_resolve_expert(entry, base, registry, where) for entry in parsed.experts]
    fallback = parsed.fallback or names[0]
    _check_name(fallback, names, "fallback", where)
    routing = parsed.routing.model_copy()
    routing.default = routing.default or fallback
    _check_name(routing.default, names, "routing.default", where)
    if routing.method == "classifier":
        if not routing.classifier:
            raise LargeForgeError(
                f"{where}: routing.method is classifier but routing.classifier names no trained "
                "router (a `largeforge router train --output DIR` directory)"
            )
        routing.classifier = str(_path(routing.classifier, base))
        _check_labels(Path(routing.classifier), names, where)
    elif not any(spec.record.keywords for spec in experts):
        raise LargeForgeError(
            f"{where}: routing.method is keywords but no expert has keywords (set `keywords` on "
            "an expert, or `largeforge expert add --keywords`)"
        )
    return RouterConfig(experts, fallback, routing, parsed.health, parsed.breaker,
                        parsed.upstream, source)


def _resolve_expert(entry: ExpertEntry, base: Path, registry: Registry,
                    where: str) -> ExpertSpec:
    given = entry.inline_fields()
    record = None
    if not given & {"model", "urls"}:  # a registered expert, maybe with some fields changed
        record = registry.find_expert(entry.name)
        if record is None:
            raise LargeForgeError(
                f"{where}: expert {entry.name!r} is not in the registry {registry.path} and "
                "gives no model or urls of its own"
            )
    model = str(_path(entry.model, base)) if entry.model is not None else (
        record.model if record else None)
    try:
        spec = make_expert(
            entry.name, model=model,
            keywords=entry.keywords if entry.keywords is not None else (
                record.keywords if record else None),
            urls=entry.urls if entry.urls is not None else (record.urls if record else ()),
            replicas=entry.replicas if entry.replicas is not None else (
                record.replicas if record and entry.urls is None else None),
            description=entry.description or (record.description if record else None),
        )
    except LargeForgeError as exc:
        raise LargeForgeError(f"{where}: {exc}") from None
    return ExpertSpec(spec, entry.api_key)


def _check_name(name: str, names: list[str], key: str, where: str) -> None:
    if name not in names:
        raise LargeForgeError(
            f"{where}: {key} {name!r} is not one of the experts ({', '.join(names)})"
        )


def _check_labels(classifier: Path, names: list[str], where: str) -> None:
    from largeforge.serving.routing import load_router_classifier

    meta, _ = load_router_classifier(classifier)
    missing = [label for label in meta.get("labels", []) if label not in names]
    if missing:
        raise LargeForgeError(
            f"{where}: the classifier {classifier} routes to {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not among the experts ({', '.join(names)})"
        )


def _path(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _describe(exc: ValidationError, path: Path) -> str:
    """The first problem: an unknown key named with where it is and what was expected, or the
    key and pydantic's message."""
    err = exc.errors()[0]
    loc = list(err["loc"])
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if err["type"] == "extra_forbidden":
        model: type[BaseModel] = RouterFile
        for part in loc[:-1]:
            if isinstance(part, int):
                continue
            annotation = model.model_fields[str(part)].annotation
            inner = getattr(annotation, "__args__", (annotation,))[0]
            model = inner if isinstance(inner, type) and issubclass(inner, BaseModel) else model
        allowed = list(model.model_fields)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"expected one of: {', '.join(allowed)}"
        return f"unknown key '{key}' in {path}; {hint}"
    message = str(err["msg"]).removeprefix("Value error, ")
    return f"{path}: {key}: {message}" if key else f"{path}: {message}"
