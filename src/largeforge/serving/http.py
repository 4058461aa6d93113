"""The request plumbing every LargeForge server shares (the inference server and the router), so
both answer a bad key, a rate limit or a bad body with the same status, code and words.

Policy lives next door and is only applied here: `auth` decides whether a key is right and a
bucket has room, `errors` shapes the OpenAI-style error bodies.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import Request

from largeforge.serving.auth import Authenticator, RateLimiter
from largeforge.serving.errors import APIError, bad_request
from largeforge.text_files import UnusableJson, loads

MAX_BODY_BYTES = 4 * 2**20  # a request body larger than this is refused (413)


def authorizer(
    api_keys: Sequence[str], rate_limit: float | None
) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency for the `/v1` routes: the request's bearer key (401 when keys are
    set and it is missing or wrong), then its rate limit (429), per key, or per client address
    when no keys are set. `rate_limit`: requests per minute; None: no limit.

    Built once per app, so each app has its own buckets."""
    authenticator = Authenticator(api_keys)
    limiter = RateLimiter(rate_limit) if rate_limit is not None else None

    async def authorize(request: Request) -> None:
        key = authenticator.check(request.headers.get("authorization"))
        if limiter is not None:
            client = request.client.host if request.client else "unknown"
            limiter.check(key if key is not None else f"address:{client}")

    return authorize


async def read_json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object: 413 when larger than `MAX_BODY_BYTES`, 400 when empty, not
    JSON or not an object. Called by the handlers, after the key and rate checks, so an
    unauthenticated client learns nothing about its body; read in chunks, so a huge body is
    refused without being held in memory."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise bad_request("The request needs a JSON body.", None, "invalid_json")
    body = _parse_body(raw)
    if not isinstance(body, dict):
        raise bad_request(f"The request body must be a JSON object, got {type(body).__name__}.",
                          None, "invalid_type")
    return body


def _parse_body(raw: bytes) -> Any:
    """The body through the checks every reader of user JSON shares (`text_files.loads`): JSON
    nested too deep, or a string that is not Unicode text (a lone surrogate, which no tokenizer
    can encode), is a 400 here as it is a file:line error in a file."""
    try:
        # Strictly: json.loads(bytes) would let UTF-8-encoded surrogates through.
        return loads(raw.decode(json.detect_encoding(raw)))
    except UnusableJson as exc:
        raise bad_request(
            f"The JSON body of your request cannot be used: {exc.msg} (line {exc.lineno}).",
            _param(exc.path), "invalid_json",
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(
            f"We could not parse the JSON body of your request ({exc}). The body must be a JSON "
            "object.", None, "invalid_json",
        ) from None


def _param(path: str | None) -> str | None:
    """`messages[0].content` as the API names fields in errors: `messages.0.content`."""
    return re.sub(r"\[(\d+)\]", r".\1", path) if path else None


def _too_large() -> APIError:
    return APIError(413, f"The request body is larger than {MAX_BODY_BYTES // 2**20} MiB.",
                    code="request_too_large")
