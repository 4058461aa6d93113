"""Reading a model out of Ollama's local store.

A reference is `ollama:NAME[:TAG]` (tag `latest` by default), `ollama:NAMESPACE/NAME[:TAG]` or
`ollama:HOST/NAMESPACE/NAME[:TAG]`; the host defaults to `registry.ollama.ai` and the namespace
to `library`, as in Ollama. The store is `$OLLAMA_MODELS`, else `~/.ollama/models`, laid out as
Ollama lays it out:

    manifests/HOST/NAMESPACE/NAME/TAG   a JSON manifest (schemaVersion 2, Docker's v2 manifest
                                        media type, a `config` and `layers`, each layer with
                                        `mediaType`, `digest` "sha256:HEX" and `size`)
    blobs/sha256-HEX                    each layer's content, named by its digest

The layers read here are the model (`application/vnd.ollama.image.model`, a GGUF file), the
chat template (`...image.template`, Go `text/template` text), the system prompt
(`...image.system`), the parameters (`...image.params`, a JSON object such as
`{"stop": [...], "temperature": 0.7}`) and the license (`...image.license`). Nothing is read
from a blob until the manifest has been checked, and a blob whose size is not the manifest's
is refused (an interrupted pull).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from largeforge.errors import LargeForgeError

PREFIX = "ollama:"
DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MEDIA_PREFIX = "application/vnd.ollama.image."
MODEL_MEDIA = MEDIA_PREFIX + "model"
TEXT_LAYERS = ("template", "system", "license")  # layers read as text, by media type suffix
PARAMS_MEDIA = MEDIA_PREFIX + "params"

_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(:[0-9]+)?")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class OllamaRef:
    host: str
    namespace: str
    name: str
    tag: str

    def manifest_path(self, store: Path) -> Path:
        return store / "manifests" / self.host / self.namespace / self.name / self.tag

    def __str__(self) -> str:
        short = f"{self.namespace}/{self.name}"
        if self.host != DEFAULT_HOST:
            short = f"{self.host}/{short}"
        elif self.namespace == DEFAULT_NAMESPACE:
            short = self.name
        return f"{short}:{self.tag}"


@dataclass
class OllamaModel:
    """What a manifest names: the GGUF blob, and the texts and parameters beside it."""

    ref: OllamaRef
    store: Path
    model_blob: Path
    model_digest: str  # "sha256:HEX"
    template: str | None = None
    system: str | None = None
    license: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    layer_digests: dict[str, str] = field(default_factory=dict)  # media type -> digest


def is_ollama_ref(ref: str) -> bool:
    return ref.startswith(PREFIX)


def parse_ref(ref: str) -> OllamaRef:
    """`ollama:NAME[:TAG]` (or `NAMESPACE/NAME`, `HOST/NAMESPACE/NAME`) as its four parts."""
    text = ref[len(PREFIX):] if ref.startswith(PREFIX) else ref
    path, tag = text, DEFAULT_TAG
    last_colon, last_slash = text.rfind(":"), text.rfind("/")
    if last_colon > last_slash:
        path, tag = text[:last_colon], text[last_colon + 1:]
    parts = path.split("/")
    if len(parts) == 1:
        parts = [DEFAULT_HOST, DEFAULT_NAMESPACE, *parts]
    elif len(parts) == 2:
        parts = [DEFAULT_HOST, *parts]
    valid = (
        len(parts) == 3
        and _HOST.fullmatch(parts[0]) is not None
        and all(_PART.fullmatch(part) for part in (*parts[1:], tag))
        and ".." not in (*parts, tag)
    )
    if not valid:
        raise LargeForgeError(
            f"{ref!r} is not an Ollama model reference; expected ollama:NAME[:TAG], "
            "ollama:NAMESPACE/NAME[:TAG] or ollama:HOST/NAMESPACE/NAME[:TAG] (letters, digits, "
            "'.', '_', '-')"
        )
    return OllamaRef(host=parts[0], namespace=parts[1], name=parts[2], tag=tag)


def store_dir() -> Path:
    """`$OLLAMA_MODELS`, else `~/.ollama/models` (where Ollama keeps pulled models)."""
    env = os.environ.get("OLLAMA_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".ollama" / "models"


def list_models(store: Path) -> list[str]:
    """The references (NAME:TAG, ...) of every manifest in the store."""
    root = store / "manifests"
    if not root.is_dir():
        return []
    found = []
    for manifest in sorted(p for p in root.glob("*/*/*/*") if p.is_file()):
        host, namespace, name, tag = manifest.relative_to(root).parts
        found.append(str(OllamaRef(host, namespace, name, tag)))
    return found


def read_model(ref: str, store: Path | None = None) -> OllamaModel:
    """Read the manifest `ref` names and the small layers it lists; the GGUF is only located."""
    parsed = parse_ref(ref)
    store = store_dir() if store is None else Path(store)
    if not store.is_dir():
        raise LargeForgeError(
            f"Ollama model {ref!r}: there is no Ollama store at {store} (set $OLLAMA_MODELS to "
            "the directory that holds Ollama's manifests/ and blobs/)"
        )
    manifest_file = parsed.manifest_path(store)
    if not manifest_file.is_file():
        known = list_models(store)
        listing = (f"models there: {', '.join(known[:10])}" if known
                   else "it holds no model manifests")
        raise LargeForgeError(
            f"Ollama model {str(parsed)!r} is not in the store {store} (no manifest "
            f"{manifest_file}); {listing}"
        )
    layers = _manifest_layers(manifest_file)
    by_media = {layer["mediaType"]: layer for layer in layers}
    model_layer = by_media.get(MODEL_MEDIA)
    if model_layer is None:
        raise LargeForgeError(
            f"Ollama manifest {manifest_file} has no model layer ({MODEL_MEDIA}); this "
            "reference is not a GGUF model"
        )
    model = OllamaModel(
        ref=parsed, store=store, model_blob=_blob(store, model_layer, manifest_file),
        model_digest=model_layer["digest"],
        layer_digests={media: layer["digest"] for media, layer in by_media.items()},
    )
    for kind in TEXT_LAYERS:
        layer = by_media.get(MEDIA_PREFIX + kind)
        if layer is not None:
            setattr(model, kind, _read_text(_blob(store, layer, manifest_file)))
    if PARAMS_MEDIA in by_media:
        params_file = _blob(store, by_media[PARAMS_MEDIA], manifest_file)
        params = _load_json(params_file, f"Ollama parameters {params_file}")
        if not isinstance(params, dict):
            raise LargeForgeError(f"Ollama parameters {params_file} are not a JSON object")
        model.params = params
    return model


def _manifest_layers(manifest_file: Path) -> list[dict[str, Any]]:
    manifest = _load_json(manifest_file, f"Ollama manifest {manifest_file}")
    if not isinstance(manifest, dict) or manifest.get("schemaVersion") != 2:
        raise LargeForgeError(
            f"Ollama manifest {manifest_file} is not a schemaVersion 2 manifest"
        )
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not all(_is_layer(layer) for layer in layers):
        raise LargeForgeError(
            f"Ollama manifest {manifest_file} has no valid `layers` list (each layer needs a "
            "mediaType, a sha256 digest and a size)"
        )
    return layers


def _is_layer(layer: Any) -> bool:
    return (
        isinstance(layer, dict)
        and isinstance(layer.get("mediaType"), str)
        and isinstance(layer.get("digest"), str)
        and _DIGEST.fullmatch(layer["digest"]) is not None
        and isinstance(layer.get("size"), int)
    )


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise LargeForgeError(f"cannot read {what}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise LargeForgeError(f"{what} is not valid JSON ({exc})") from exc


def _blob(store: Path, layer: dict[str, Any], manifest_file: Path) -> Path:
    """The file of a layer, checked to exist with the manifest's size."""
    digest = layer["digest"]
    path = store / "blobs" / digest.replace(":", "-")
    if not path.is_file():
        raise LargeForgeError(
            f"Ollama manifest {manifest_file} names the blob {digest} ({layer['mediaType']}), "
            f"which is missing from {store / 'blobs'}; pull the model again"
        )
    size = path.stat().st_size
    if size != layer["size"]:
        raise LargeForgeError(
            f"Ollama blob {path} has {size} bytes, but its manifest says {layer['size']}: an "
            "incomplete download; pull the model again"
        )
    return path


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LargeForgeError(f"cannot read the Ollama blob {path} as text: {exc}") from exc
