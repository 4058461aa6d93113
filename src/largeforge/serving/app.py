"""The OpenAI-compatible HTTP API over the continuous-batching engine.

    app = create_app(engine, tokenizer, "my-model", api_keys=["sk-1"], rate_limit=60)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`,
`GET /v1/models/{model}` (these need a key when keys are set), `GET /health`, `GET /metrics`.

A request is checked in this order: API key (401), rate limit (429), JSON and fields (400), model
name (404), prompt plus `max_tokens` within the context (400); then its `n` choices are queued
in the engine at once (503 when the queue is full; nothing stays queued then). Prompts are
encoded exactly as `largeforge generate` encodes them (`encode_prompt`), chat conversations as
`largeforge chat` renders them (the chat template with the generation prompt; generation stops
at EOS and at the template's end-of-turn marker), so greedy outputs are the same text.

Streams are server-sent events with OpenAI's chunk shapes, ending with `data: [DONE]`. A client
that goes away (a closed stream, or a dropped connection while waiting for a whole response)
cancels its engine requests, so the batch slot is free at the next token step.

The app owns the engine's life: it is started when the app starts and shut down when it stops.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from largeforge.chat_templates import tokenizer_adds_bos
from largeforge.errors import LargeForgeError
from largeforge.inference.chat import END_OF_TURN_MARKERS
from largeforge.inference.engine import ContinuousBatchingEngine
from largeforge.inference.generate import encode_prompt
from largeforge.inference.requests import (
    FINISH_CANCELLED,
    GenerationRequest,
    QueueFullError,
    RequestHandle,
    TokenEvent,
)
from largeforge.inference.sampling import SamplingParams
from largeforge.serving.errors import (
    APIError,
    bad_request,
    context_length_exceeded,
    install_error_handlers,
    model_not_found,
    overloaded,
    validation_error,
)
from largeforge.serving.http import authorizer, read_json_object
from largeforge.serving.metrics import RequestMetricsMiddleware, ServerMetrics
from largeforge.serving.openai_schema import (
    SSE_DONE,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ModelCard,
    ModelList,
    Usage,
    new_id,
    now,
    sse_event,
)

# max_tokens for a chat request that names none, when the model does not say its context.
DEFAULT_MAX_TOKENS = 256

COMPLETIONS, CHAT, MODELS = "/v1/completions", "/v1/chat/completions", "/v1/models"
ENDPOINTS = (COMPLETIONS, CHAT, MODELS, "/health", "/metrics")


@dataclass
class _Job:
    """One engine request: choice `index` of prompt `prompt_index`."""

    index: int
    prompt_index: int
    request: GenerationRequest


@dataclass
class _Choice:
    """What a choice produced so far."""

    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: APIError | None = None


class _ServerState:
    def __init__(
        self,
        engine: ContinuousBatchingEngine,
        tokenizer: Any,
        model_name: str,
        chat_template: str | None,
        metrics: ServerMetrics,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.chat_template = chat_template
        self.metrics = metrics
        self.created = now()
        self.chat_eos, self.chat_stops = chat_end_of_turn(
            tokenizer, chat_template, set(engine.eos_token_ids)
        )


def chat_end_of_turn(
    tokenizer: Any, template: str | None, eos_ids: set[int]
) -> tuple[set[int], list[str]]:
    """As `ChatSession`: the end-of-turn markers the template writes end a reply, as an EOS id
    when the marker is one token, else as a stop string."""
    eos = set(eos_ids)
    stops: list[str] = []
    for marker in END_OF_TURN_MARKERS if template else ():
        if marker not in template:  # type: ignore[operator]
            continue
        ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            eos.add(int(ids[0]))
        else:
            stops.append(marker)
    return eos, stops


def create_app(
    engine: ContinuousBatchingEngine,
    tokenizer: Any,
    model_name: str,
    *,
    api_keys: Sequence[str] = (),
    rate_limit: float | None = None,
    chat_template: str | None = None,
) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`.

    `api_keys`: accepted keys (none: open). `rate_limit`: requests per minute per key (per client
    address without keys); None: no limit. `chat_template`: overrides the tokenizer's own.
    """
    template = chat_template or _own_template(tokenizer)
    metrics = ServerMetrics(lambda: engine.stats, endpoints=ENDPOINTS)
    authorize = authorizer(api_keys, rate_limit)
    state = _ServerState(engine, tokenizer, model_name, template, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.shutdown()

    app = FastAPI(title="LargeForge", summary="OpenAI-compatible API", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)

    api = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @api.get("/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=state.created)])

    @api.get("/models/{model}")
    async def get_model(model: str) -> ModelCard:
        if model != model_name:
            raise model_not_found(model)
        return ModelCard(id=model_name, created=state.created)

    @api.post("/completions", response_model=None)
    async def completions(request: Request) -> Response:
        body = _parse(CompletionRequest, await read_json_object(request))
        _check_model(state, body.model)
        prompts = [_completion_ids(state, p) for p in body.prompts()]
        jobs = _jobs(state, body, prompts, body.max_tokens, "prompt", None, ())
        return await _respond(state, request, body, jobs, chat=False)

    @api.post("/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        body = _parse(ChatCompletionRequest, await read_json_object(request))
        _check_model(state, body.model)
        ids = _chat_ids(state, body.conversation())
        jobs = _jobs(state, body, [ids], body.token_limit(), "messages", state.chat_eos,
                     state.chat_stops)
        return await _respond(state, request, body, jobs, chat=True)

    app.include_router(api)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = engine.stats
        return {"status": "ok", "model": model_name, "running": stats.running,
                "queue_depth": stats.queue_depth}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    return app


def _own_template(tokenizer: Any) -> str | None:
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default") or next(iter(own.values()), None)
    return own or None


# --- request parsing ---------------------------------------------------------------------------


def _parse(model: type[BaseModel], payload: dict[str, Any]) -> Any:
    """The request's fields, checked by the schema: a 400 naming the first bad field."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None


def _check_model(state: _ServerState, name: str) -> None:
    if name != state.model_name:
        raise model_not_found(name)


def _completion_ids(state: _ServerState, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return list(encode_prompt(state.tokenizer, prompt)[0].tolist())
    vocab = state.engine.vocab_size
    if vocab is not None and any(not 0 <= t < vocab for t in prompt):
        raise bad_request(f"The prompt has token ids outside the vocabulary (0..{vocab - 1}).",
                          "prompt", "invalid_value")
    return list(prompt)


def _chat_ids(state: _ServerState, messages: list[dict[str, str]]) -> list[int]:
    """The conversation rendered with the chat template and the assistant cue, encoded as
    `ChatSession.prompt_ids` does (BOS only where the tokenizer expects one and the template
    did not write it)."""
    if state.chat_template is None:
        raise bad_request(
            f"The model `{state.model_name}` has no chat template; use /v1/completions, or start "
            "the server with --chat-template.", "messages", "no_chat_template",
        )
    try:
        text = state.tokenizer.apply_chat_template(
            messages, chat_template=state.chat_template, add_generation_prompt=True,
            tokenize=False,
        )
    except Exception as exc:  # jinja2 errors: a template that rejects these messages
        raise bad_request(f"The chat template failed on these messages: {exc}", "messages",
                          "invalid_messages") from exc
    ids = encode_prompt(state.tokenizer, str(text), add_bos=tokenizer_adds_bos(state.tokenizer))
    return list(ids[0].tolist())


def _jobs(
    state: _ServerState,
    body: CompletionRequest | ChatCompletionRequest,
    prompts: list[list[int]],
    max_tokens: int | None,
    prompt_param: str,
    eos_ids: set[int] | None,
    end_of_turn: Sequence[str],
) -> list[_Job]:
    """n engine requests per prompt, after checking every prompt against the context, so a
    request is refused before any of it is queued. `eos_ids` (None: the engine's) and the
    `end_of_turn` stop strings end a chat reply."""
    stops = tuple(dict.fromkeys([*body.stop_list(), *end_of_turn]))
    context = state.engine.context_length
    jobs: list[_Job] = []
    for p, ids in enumerate(prompts):
        budget = max_tokens
        if context is not None:
            room = context - len(ids)
            if budget is None and room < 1 or budget is not None and budget > room:
                raise context_length_exceeded(context, len(ids), budget, prompt_param)
            if budget is None:
                budget = room
        budget = DEFAULT_MAX_TOKENS if budget is None else budget
        for j in range(body.n):
            params = SamplingParams(
                max_new_tokens=budget, temperature=body.temperature, top_k=body.top_k,
                top_p=body.top_p, repetition_penalty=body.repetition_penalty,
                seed=None if body.seed is None else body.seed + j,
                stop_at_eos=not body.ignore_eos,
            )
            request = GenerationRequest(ids, params, stop=stops, eos_token_ids=eos_ids)
            jobs.append(_Job(p * body.n + j, p, request))
    return jobs


# --- running requests --------------------------------------------------------------------------


def _submit(state: _ServerState, jobs: list[_Job]) -> list[RequestHandle]:
    """All jobs queued, or none (503 when the queue is full)."""
    handles: list[RequestHandle] = []
    try:
        for job in jobs:
            handles.append(state.engine.submit(job.request))
    except QueueFullError as exc:
        _cancel(handles)
        raise overloaded(f"The server is busy: {exc}.") from None
    except LargeForgeError as exc:
        _cancel(handles)
        raise bad_request(str(exc)) from None
    return handles


def _cancel(handles: Sequence[RequestHandle]) -> None:
    for handle in handles:
        handle.cancel()


# Tasks the event loop must not lose: asyncio keeps only weak references to running tasks.
_background: set[asyncio.Task[Any]] = set()


def _spawn(coro: Any) -> asyncio.Task[Any]:
    task = asyncio.create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


class _Run:
    """The engine requests of one HTTP request: events of all choices merged into one queue,
    time to first token and token counts recorded into the metrics.

    A pump task per choice reads its handle to the end (also after a cancel, so the metrics see
    every generation finish); a watcher cancels everything when the client disconnects."""

    def __init__(self, state: _ServerState, request: Request, jobs: list[_Job]) -> None:
        self.state = state
        self.jobs = jobs
        self.path = request.url.path
        self.start = getattr(request.state, "start_time", time.perf_counter())
        self.choices = [_Choice() for _ in jobs]
        self.events: asyncio.Queue[tuple[int, TokenEvent | None]] = asyncio.Queue()
        self.first_token = False
        self.disconnected = False
        self.handles = _submit(state, jobs)
        for i, handle in enumerate(self.handles):
            _spawn(self._pump(i, handle))
        self.watcher = _spawn(self._watch_disconnect(request))

    async def _pump(self, i: int, handle: RequestHandle) -> None:
        choice = self.choices[i]
        try:
            async for event in handle:
                if event.token_ids and not self.first_token:
                    self.first_token = True
                    self.state.metrics.observe_first_token(
                        self.path, time.perf_counter() - self.start
                    )
                choice.text.append(event.text)
                choice.prompt_tokens = event.prompt_tokens
                choice.completion_tokens = event.completion_tokens
                if event.finish_reason is not None:
                    choice.finish_reason = event.finish_reason
                    self.state.metrics.observe_generation(
                        event.finish_reason, event.prompt_tokens, event.completion_tokens
                    )
                self.events.put_nowait((i, event))
        except LargeForgeError as exc:  # the engine failed this request
            choice.error = APIError(500, f"Generation failed: {exc}", "server_error")
            self.state.metrics.observe_generation("error", 0, 0)
        finally:
            self.events.put_nowait((i, None))

    async def _watch_disconnect(self, request: Request) -> None:
        """Cancel the engine requests when the client goes away (the body has been read, so
        the next message the server gets is the disconnect)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                self.cancel()
                return

    def cancel(self) -> None:
        _cancel(self.handles)

    async def events_in_order(self) -> AsyncIterator[tuple[int, TokenEvent]]:
        """Events of all choices as they come, until every choice has finished."""
        open_choices = len(self.handles)
        while open_choices:
            i, event = await self.events.get()
            if event is None:
                open_choices -= 1
                error = self.choices[i].error
                if error is not None:
                    raise error
                continue
            yield i, event

    async def wait(self) -> None:
        async for _ in self.events_in_order():
            pass

    def close(self) -> None:
        """Cancel whatever still runs (nothing, after a complete answer). Not async: it runs
        in the `finally` of a stream whose task the server has cancelled."""
        self.watcher.cancel()
        self.cancel()

    def usage(self) -> Usage:
        """Prompt tokens once per prompt (as OpenAI counts them with n > 1), completion tokens
        of every choice."""
        per_prompt: dict[int, int] = {}
        for job, choice in zip(self.jobs, self.choices, strict=True):
            per_prompt[job.prompt_index] = choice.prompt_tokens or len(job.request.prompt_ids)
        return Usage.of(sum(per_prompt.values()),
                        sum(c.completion_tokens for c in self.choices))


def _finish_reason(choice: _Choice) -> Any:
    return choice.finish_reason if choice.finish_reason in ("stop", "length") else None


async def _respond(
    state: _ServerState,
    request: Request,
    body: CompletionRequest | ChatCompletionRequest,
    jobs: list[_Job],
    *,
    chat: bool,
) -> Response:
    run = _Run(state, request, jobs)
    if body.stream:
        stream = _chat_stream(run, body) if chat else _completion_stream(run, body)
        return StreamingResponse(
            stream, media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        await run.wait()
    finally:
        run.close()
    if any(c.finish_reason == FINISH_CANCELLED for c in run.choices):
        if run.disconnected:  # nobody reads this answer
            return JSONResponse({}, status_code=499)
        raise overloaded("The server is shutting down.")
    usage = run.usage()
    if chat:
        return JSONResponse(ChatCompletionResponse(
            model=state.model_name, usage=usage,
            choices=[ChatChoice(index=job.index,
                                message=AssistantMessage(content="".join(c.text)),
                                finish_reason=_finish_reason(c))
                     for job, c in zip(jobs, run.choices, strict=True)],
        ).model_dump())
    return JSONResponse(CompletionResponse(
        model=state.model_name, usage=usage,
        choices=[CompletionChoice(index=job.index, text="".join(c.text),
                                  finish_reason=_finish_reason(c))
                 for job, c in zip(jobs, run.choices, strict=True)],
    ).model_dump())


async def _completion_stream(run: _Run, body: CompletionRequest) -> AsyncIterator[str]:
    chunk_id, model = new_id("cmpl"), run.state.model_name

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        return sse_event(CompletionChunk(id=chunk_id, model=model, choices=choices, usage=usage))

    try:
        async for i, event in run.events_in_order():
            index = run.jobs[i].index
            if event.text:
                yield chunk([CompletionChoice(index=index, text=event.text)])
            if event.finish_reason is not None:
                reason = _finish_reason(run.choices[i])
                yield chunk([CompletionChoice(index=index, text="", finish_reason=reason)])
        if body.include_usage:
            yield chunk([], run.usage())
        yield SSE_DONE
    except APIError as exc:
        yield sse_event(json.dumps(exc.body()))
    finally:
        run.close()


async def _chat_stream(run: _Run, body: ChatCompletionRequest) -> AsyncIterator[str]:
    chunk_id, model = new_id("chatcmpl"), run.state.model_name

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return sse_event(
            ChatCompletionChunk(id=chunk_id, model=model, choices=choices, usage=usage)
        )

    try:
        # The role comes first, in a chunk of its own for every choice, as OpenAI sends it.
        for job in run.jobs:
            yield chunk([ChatChunkChoice(index=job.index,
                                         delta=Delta(role="assistant", content=""))])
        async for i, event in run.events_in_order():
            index = run.jobs[i].index
            if event.text:
                yield chunk([ChatChunkChoice(index=index, delta=Delta(content=event.text))])
            if event.finish_reason is not None:
                reason = _finish_reason(run.choices[i])
                yield chunk([ChatChunkChoice(index=index, delta=Delta(), finish_reason=reason)])
        if body.include_usage:
            yield chunk([], run.usage())
        yield SSE_DONE
    except APIError as exc:
        yield sse_event(json.dumps(exc.body()))
    finally:
        run.close()
