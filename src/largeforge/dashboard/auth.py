"""The dashboard's token: required whenever it listens beyond this machine (any address but a
loopback one), checked on every request, the event streams and static files included.

A browser gives it once as `?token=...`; the dashboard then sets it as an HttpOnly cookie so
the pages' own requests (and EventSource, which cannot send headers) carry it. Scripts send
`Authorization: Bearer TOKEN`. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
import os

from largeforge.errors import LargeForgeError

TOKEN_ENV = "LARGEFORGE_DASHBOARD_TOKEN"
COOKIE = "largeforge_dashboard_token"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def dashboard_token(host: str, token: str | None) -> str | None:
    """The token to require: `--token`, else $LARGEFORGE_DASHBOARD_TOKEN; an error when the
    address is not a loopback one and neither is set."""
    token = token or os.environ.get(TOKEN_ENV) or None
    if token is not None and (len(token) < 8 or any(c.isspace() for c in token)):
        raise LargeForgeError("the dashboard token must be at least 8 characters, no spaces")
    if token is None and not is_loopback(host):
        raise LargeForgeError(
            f"--host {host} makes the dashboard reachable from other machines: give a token "
            f"with --token or ${TOKEN_ENV} (every request must then carry it)"
        )
    return token


def token_matches(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())
