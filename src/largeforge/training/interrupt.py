"""Stopping a run cleanly on SIGINT: the first Ctrl-C (or `kill -INT`, which is what the
dashboard's Stop sends) asks the loop to stop after the step in progress, save a checkpoint and
end with status `stopped`; `--resume` continues from there. A second SIGINT interrupts at once
(KeyboardInterrupt, the run is marked failed), for a step that never ends.

Only a single-process run handles it: under torchrun every rank would have to agree on the step
to stop at, so there SIGINT keeps its usual meaning (torchrun forwards it and the job ends).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType


class StopRequest:
    """Whether a stop was asked for; `requested` is read by the loop after each step."""

    def __init__(self) -> None:
        self.requested = False


@contextmanager
def stop_on_sigint(enabled: bool, say: Callable[[str], None]) -> Iterator[StopRequest]:
    """While inside, SIGINT sets `requested` (once) instead of raising. Signal handlers can
    only be set from the main thread: elsewhere (a library user's worker thread) nothing
    changes."""
    request = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        if request.requested:
            raise KeyboardInterrupt
        request.requested = True
        say("stop requested (SIGINT): saving a checkpoint after this step; "
            "press Ctrl-C again to abort without saving")

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield request
    finally:
        signal.signal(signal.SIGINT, previous)
