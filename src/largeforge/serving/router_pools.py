"""The router's view of its experts: each expert a pool of replicas, each replica guarded by a
circuit breaker.

Among an expert's replicas the one with the fewest outstanding requests is chosen (ties in turn).
A replica is skipped while its last health check failed or its circuit breaker is open:
`failure_threshold` consecutive failed requests open it, and after `cooldown` seconds one trial
request is let through (half-open), whose outcome closes or re-opens it.

Plain bookkeeping, no I/O: the proxy and the health checks change these objects, the metrics and
`/health` read them. Everything runs on the event loop's one thread, so no locks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"


class CircuitBreaker:
    """Closed: requests pass. `threshold` consecutive failures open it: no request passes for
    `cooldown` seconds; then it is half-open and lets one trial request through, whose success
    closes it and whose failure opens it again."""

    def __init__(self, threshold: int, cooldown: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self._trial = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return CLOSED
        return HALF_OPEN if self.clock() - self.opened_at >= self.cooldown else OPEN

    def available(self) -> bool:
        state = self.state
        return state == CLOSED or (state == HALF_OPEN and not self._trial)

    def acquire(self) -> bool:
        """Take a pass for one request: False when the breaker lets none through now."""
        if not self.available():
            return False
        if self.state == HALF_OPEN:
            self._trial = True
        return True

    def success(self) -> None:
        self.failures, self.opened_at, self._trial = 0, None, False

    def failure(self) -> None:
        self.failures += 1
        self._trial = False
        if self.opened_at is not None or self.failures >= self.threshold:
            self.opened_at = self.clock()

    def release(self) -> None:
        """A request that ended without telling (the client left): the trial slot is free."""
        self._trial = False


@dataclass(eq=False)
class Replica:
    """One server of an expert."""

    expert: str
    url: str
    breaker: CircuitBreaker
    outstanding: int = 0
    healthy: bool | None = None  # None: not checked yet
    model_id: str | None = None  # the model name the server serves
    last_error: str | None = None

    def usable(self) -> bool:
        return self.healthy is not False and self.breaker.available()

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "healthy": self.healthy, "circuit": self.breaker.state,
                "outstanding": self.outstanding, "model": self.model_id,
                "last_error": self.last_error}


@dataclass
class ExpertPool:
    """An expert's replicas, and the key its servers want."""

    name: str
    replicas: list[Replica]
    api_key: str | None = None
    description: str | None = None
    _turn: int = 0

    def pick(self, exclude: set[int]) -> Replica | None:
        """The usable replica with the fewest outstanding requests (ties taken in turn), not
        in `exclude` (ids of replicas already tried); None when there is none."""
        self._turn += 1
        n = len(self.replicas)
        order = sorted(
            (r for r in self.replicas if id(r) not in exclude and r.usable()),
            key=lambda r: (r.outstanding, (self.replicas.index(r) - self._turn) % n),
        )
        for replica in order:
            if replica.breaker.acquire():
                return replica
        return None

    def available(self) -> bool:
        return any(r.usable() for r in self.replicas)

    def upstream_headers(self) -> dict[str, str]:
        """The headers of every request to this expert's servers (health checks included):
        they want their own key, not the client's."""
        headers = {"content-type": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers
