"""API keys and per-key rate limits.

Keys come from `--api-key` (repeatable), the environment variable `LARGEFORGE_API_KEYS`
(comma-separated) and `--api-key-file` (one key per line; blank lines and `#` comments are
skipped), all together. With no key configured the server is open (and binds 127.0.0.1 by
default). A request names its key as `Authorization: Bearer KEY`, as the OpenAI clients send it;
keys are compared in constant time, against every configured key, so timing tells nothing about
how much of a key was right.

The rate limit is a token bucket per key (per client address when no keys are set): it holds up
to `per_minute` requests and refills at `per_minute / 60` per second, so a key may burst up to its
minute's worth and then gets one request every `60 / per_minute` seconds. A request over the
limit gets 429 with `Retry-After` (whole seconds until the bucket holds a request again).
"""

from __future__ import annotations

import hmac
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from largeforge.errors import LargeForgeError
from largeforge.serving.errors import rate_limited, unauthorized

API_KEYS_ENV = "LARGEFORGE_API_KEYS"


def load_api_keys(
    keys: Iterable[str] = (),
    key_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """All configured keys, without duplicates, in the order given: flags, environment, file.

    A key file that is missing, unreadable or holds no key is an error (a server meant to be
    protected must not start open), as is a key with whitespace inside it.
    """
    env = os.environ if env is None else env
    found: list[str] = [k.strip() for k in keys]
    found += [k.strip() for k in env.get(API_KEYS_ENV, "").split(",") if k.strip()]
    if key_file is not None:
        path = Path(key_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise LargeForgeError(f"cannot read the API key file {path}: {exc}") from exc
        from_file = [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
        if not from_file:
            raise LargeForgeError(f"the API key file {path} holds no key (one key per line)")
        found += from_file
    for key in found:
        if not key:
            raise LargeForgeError("an API key is empty")
        if any(c.isspace() for c in key):
            raise LargeForgeError("an API key contains whitespace; keys are single words")
    return list(dict.fromkeys(found))


class Authenticator:
    """Checks `Authorization: Bearer KEY` against the configured keys."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> str | None:
        """The key the request presents (None when no keys are configured); raises a 401
        `APIError` when it is missing or wrong."""
        if not self._keys:
            return None
        if not authorization:
            raise unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
            )
        scheme, _, presented = authorization.partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            raise unauthorized("The Authorization header must be 'Bearer YOUR_KEY'.")
        given = presented.encode()
        # Compare with every key (no early exit), each in constant time.
        matches = [hmac.compare_digest(given, key) for key in self._keys]
        if not any(matches):
            raise unauthorized("Incorrect API key provided.")
        return presented


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class RateLimiter:
    """A token bucket per key: `per_minute` requests at most in a burst, refilled steadily."""

    per_minute: float
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if not self.per_minute > 0:
            raise LargeForgeError(
                f"the rate limit must be > 0 requests per minute, got {self.per_minute}"
            )

    def wait_time(self, key: str) -> float:
        """Take one request from `key`'s bucket: 0.0 when allowed, else the seconds until the
        bucket holds a whole request again (nothing is taken then)."""
        rate = self.per_minute / 60.0
        with self._lock:
            now = self.clock()
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(self.per_minute, now)
            bucket.tokens = min(self.per_minute, bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / rate

    def check(self, key: str) -> None:
        """Raise a 429 `APIError` with Retry-After when `key` is over its limit."""
        wait = self.wait_time(key)
        if wait > 0:
            raise rate_limited(wait, self.per_minute)
