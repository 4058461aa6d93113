"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

`APIError` is raised by handlers and dependencies; `install_error_handlers(app)` turns it, and
FastAPI's own errors, into that body: request validation (FastAPI answers 422) and invalid JSON
become 400 naming the field, unknown routes 404, wrong methods 405, and anything unexpected a
500 that does not leak the exception. A `LargeForgeError` that reaches a handler is a problem
with the request (400).

Generic: no engine or model imports, so every server of the project (the router too) uses it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from largeforge.errors import LargeForgeError

log = logging.getLogger("largeforge.serving")

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"
OVERLOADED = "overloaded_error"


def error_body(
    message: str, type: str = INVALID_REQUEST, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class APIError(Exception):
    """An error answered with `status` and an OpenAI-style body (and optional headers)."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers or None)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, INVALID_REQUEST, param, code)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", NOT_FOUND, "model",
                    "model_not_found")


def unauthorized(message: str) -> APIError:
    return APIError(401, message, AUTHENTICATION, None, "invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def rate_limited(retry_after_s: float, limit_per_minute: float) -> APIError:
    seconds = max(1, math.ceil(retry_after_s))  # Retry-After takes whole seconds
    return APIError(
        429,
        f"Rate limit reached: {limit_per_minute:g} requests per minute for this key; "
        f"try again in {seconds} s.",
        RATE_LIMIT, None, "rate_limit_exceeded", headers={"Retry-After": str(seconds)},
    )


def overloaded(message: str, retry_after_s: int = 1) -> APIError:
    return APIError(503, message, OVERLOADED, None, "server_overloaded",
                    headers={"Retry-After": str(retry_after_s)})


def context_length_exceeded(
    context: int, prompt_tokens: int, max_tokens: int | None, param: str
) -> APIError:
    if max_tokens is None:
        asked = f"the prompt is {prompt_tokens} tokens and leaves no room for a reply"
    else:
        asked = (f"you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
                 f"{param}, {max_tokens} in the completion)")
    return bad_request(
        f"This model's maximum context length is {context} tokens; {asked}. Please reduce the "
        f"length of the {param} or max_tokens.",
        param, "context_length_exceeded",
    )


def _is_tag(part: Any) -> bool:
    """A union-member tag pydantic puts in locations (`str`, `list[int]`), not a field name."""
    return isinstance(part, str) and ("[" in part or part in _TAGS)


def _param(loc: Sequence[Any]) -> str | None:
    """The field a validation error is about: its location without FastAPI's leading `body`
    and without union-member tags, as `messages.0.content`."""
    if loc and loc[0] == "body":  # FastAPI's location; pydantic's own starts at the field
        loc = loc[1:]
    return ".".join(str(p) for p in loc if not _is_tag(p)) or None


def _union_tags(errors: Sequence[Mapping[str, Any]], param: str) -> list[str]:
    """The members of a union field that all failed (`str`, `list[int]`, ...)."""
    tags: list[str] = []
    for error in errors:
        loc = [p for p in error.get("loc", ()) if p != "body"]
        for n, part in enumerate(loc):
            if _is_tag(part):
                if ".".join(str(p) for p in loc[:n]) == param and part not in tags:
                    tags.append(str(part))
                break
    return tags


_TAGS = {"str", "int", "float", "bool", "dict", "list"}


def _message(error: Mapping[str, Any]) -> str:
    msg = str(error.get("msg", "invalid value"))
    return msg.removeprefix("Value error, ")


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """One 400 for FastAPI's list of validation errors: the first field named, its message,
    and the other messages about the same field (a union type reports one per member)."""
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return bad_request(
            f"We could not parse the JSON body of your request ({detail}). The body must be a "
            "JSON object.", None, "invalid_json",
        )
    if first.get("type") == "missing" and list(first.get("loc", ())) == ["body"]:
        return bad_request("The request needs a JSON body.", None, "invalid_json")
    param = _param(first.get("loc", ()))
    if first.get("type") == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param,
                           "unknown_parameter")
    if param is None:  # the body itself: not an object
        return bad_request(f"The request body must be a JSON object: {_message(first)}", None,
                           "invalid_type")
    got = "" if first.get("type") == "missing" else f" (got {_short(first.get('input'))})"
    if first.get("type") == "missing":
        return bad_request(f"Missing required parameter: '{param}'", param, "missing_required")
    tags = _union_tags(errors, param)
    if len(tags) > 1:
        return bad_request(
            f"Invalid type for '{param}': expected one of {', '.join(tags)}{got}", param,
            "invalid_type",
        )
    same = [e for e in errors if _param(e.get("loc", ())) == param]
    messages = list(dict.fromkeys(_message(e) for e in same))
    return bad_request(f"Invalid value for '{param}': {' or '.join(messages)}{got}", param,
                       "invalid_value")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_error(list(exc.errors())).response()


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    kind = SERVER_ERROR if exc.status_code >= 500 else INVALID_REQUEST
    return JSONResponse(error_body(message, kind), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _largeforge(_: Request, exc: Exception) -> JSONResponse:
    return bad_request(str(exc)).response()


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        error_body("The server had an error while processing your request.", SERVER_ERROR),
        status_code=500,
    )


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of `app` with an OpenAI-style body."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(LargeForgeError, _largeforge)
    app.add_exception_handler(Exception, _unexpected)
