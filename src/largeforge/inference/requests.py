"""The client side of the continuous-batching engine: a request, the events it produces, its
result, and the `RequestHandle` a client reads them from (blocking or with asyncio) while the
engine thread writes them."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field

from largeforge.errors import LargeForgeError
from largeforge.inference.sampling import SamplingParams

logger = logging.getLogger("largeforge.inference.engine")  # the engine's log, as before

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"


class QueueFullError(LargeForgeError):
    """The engine's waiting queue is full; try again later (the server answers 503)."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stop: Sequence[str] = ()  # output is cut before the first stop string, never includes it
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # End-of-sequence ids for this request (e.g. a chat template's end-of-turn token);
    # None takes the engine's.
    eos_token_ids: set[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # one stop string, not its characters
            self.stop = (self.stop,)


@dataclass
class TokenEvent:
    text: str  # new text since the previous event ("" while text is held back)
    token_ids: list[int]  # new token ids in this event (an EOS is not included)
    finish_reason: str | None  # None while running; "stop", "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int  # generated so far (an EOS is not counted)


@dataclass
class GenerationResult:
    """A finished request: all its events together."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class EngineStats:
    queue_depth: int
    running: int
    max_batch_size: int
    max_queue: int
    total_requests: int
    total_prompt_tokens: int  # of the requests admitted (prefilled) so far
    total_completion_tokens: int


class RequestHandle:
    """Events of one request, in order; the last one has a `finish_reason`.

    Iterate it once, blocking (`for event in handle`) or with asyncio (`async for event in
    handle`, no busy waiting). Leaving the iteration before the last event (a `break`, an
    exception, a cancelled asyncio task: a client that went away) cancels the request.
    """

    def __init__(self, request: GenerationRequest,
                 cancel: Callable[[RequestHandle], None]) -> None:
        self.request_id = request.request_id
        self.request = request
        self._cancel_in_engine = cancel  # the engine drops the request at its next step
        self._events: deque[TokenEvent] = deque()
        self._lock = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._callbacks: list[Callable[[RequestHandle], None]] = []
        self._error: str | None = None
        self.finished = False  # the last event was emitted
        self.cancel_requested = False

    # --- producer side (the engine thread) ---
    def _emit(self, event: TokenEvent) -> None:
        with self._lock:
            if self.finished:
                return
            self._events.append(event)
            if event.finish_reason is not None:
                self.finished = True
            self._wake()
        if self.finished:
            self._run_callbacks()

    def _fail(self, message: str) -> None:
        with self._lock:
            if self.finished:
                return
            self._error, self.finished = message, True
            self._wake()
        self._run_callbacks()

    def _wake(self) -> None:  # with self._lock held
        self._lock.notify_all()
        waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # that consumer's event loop has closed: nobody to wake
                pass

    def _run_callbacks(self) -> None:
        for callback in self._callbacks:
            try:
                callback(self)
            except Exception:  # a consumer's bug must not stop the engine for everyone
                logger.exception("done callback of request %s failed", self.request_id)

    # --- consumer side ---
    def add_done_callback(self, callback: Callable[[RequestHandle], None]) -> None:
        """Call `callback(handle)` once the request has finished (on the engine thread, or at
        once when it already has). Keep it short: the engine waits for it."""
        with self._lock:
            if not self.finished:
                self._callbacks.append(callback)
                return
        callback(self)

    def cancel(self) -> None:
        """Stop generating: a waiting request leaves the queue now, a running one frees its
        batch slot and KV cache at the next token step; the last event says "cancelled"."""
        self.cancel_requested = True
        self._cancel_in_engine(self)

    def _pop(self) -> TokenEvent | None:  # with self._lock held
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            raise LargeForgeError(f"generation failed: {self._error}")
        return None

    def __iter__(self) -> Iterator[TokenEvent]:
        done = False
        try:
            while not done:
                with self._lock:
                    event = self._pop()
                    while event is None:
                        self._lock.wait()
                        event = self._pop()
                done = event.finish_reason is not None
                yield event
        finally:
            if not done:
                self.cancel()

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[TokenEvent]:
        loop = asyncio.get_running_loop()
        done = False
        try:
            while not done:
                with self._lock:
                    event = self._pop()
                    if event is None:
                        future: asyncio.Future[None] = loop.create_future()
                        self._waiters.append((loop, future))
                if event is None:
                    try:
                        await future
                    except asyncio.CancelledError:
                        with self._lock:
                            if (loop, future) in self._waiters:
                                self._waiters.remove((loop, future))
                        raise
                    continue
                done = event.finish_reason is not None
                yield event
        finally:
            if not done:
                self.cancel()

    def result(self) -> GenerationResult:
        """Wait for the end and return the whole output."""
        return self._collect(list(self))

    async def aresult(self) -> GenerationResult:
        return self._collect([event async for event in self])

    def _collect(self, events: list[TokenEvent]) -> GenerationResult:
        last = events[-1]
        return GenerationResult(
            request_id=self.request_id,
            text="".join(e.text for e in events),
            token_ids=[t for e in events for t in e.token_ids],
            finish_reason=last.finish_reason or FINISH_CANCELLED,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
        )


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
