"""The chat playground: one model at a time loaded in the dashboard's process, replies streamed
piece by piece as they are decoded.

A conversation goes through the model's chat template (or a built-in one chosen in the page);
a model without one (a pretrained base) is offered plain completion instead, said as such. One
generation runs at a time: on a laptop CPU two would each run at half speed, and a training run
started from the dashboard is a process of its own, so chatting never pauses it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from largeforge.errors import LargeForgeError

PLAIN = "none"  # the template choice that means plain completion


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    template: str | None = None  # None: the model's own; a built-in name; PLAIN
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 128
    seed: int | None = None


class Playground:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: tuple[str, Any, Any] | None = None

    def _load(self, model_ref: str) -> tuple[Any, Any]:
        if self._loaded is None or self._loaded[0] != model_ref:
            from largeforge.inference.generate import load_for_inference

            self._loaded = None  # the old model is freed before the new one loads
            model, tokenizer = load_for_inference(model_ref)
            self._loaded = (model_ref, model, tokenizer)
        return self._loaded[1], self._loaded[2]

    def describe(self, model_ref: str) -> dict[str, Any]:
        """Whether the model has a chat template (decides what the page offers)."""
        from largeforge.runs import resolve_model_dir
        from largeforge.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(resolve_model_dir(model_ref))
        return {"has_chat_template": bool(getattr(tokenizer, "chat_template", None))}

    def stream(self, request: ChatRequest) -> Iterator[str]:
        """The reply, piece by piece; holds the one generation slot while it runs."""
        from largeforge.inference.chat import ChatSession, resolve_chat_template
        from largeforge.inference.generate import stream_text
        from largeforge.inference.sampling import SamplingParams

        if not request.messages or request.messages[-1].get("role") != "user":
            raise LargeForgeError("the conversation must end with a user message")
        params = SamplingParams(max_new_tokens=request.max_new_tokens,
                                temperature=request.temperature, top_p=request.top_p,
                                seed=request.seed)
        with self._lock:
            model, tokenizer = self._load(request.model)
            if request.template == PLAIN:
                prompt = "\n".join(m["content"] for m in request.messages if m["role"] != "system")
                yield from stream_text(model, tokenizer, prompt, params)
                return
            template = resolve_chat_template(request.template) if request.template else None
            session = ChatSession(model, tokenizer, params=params, chat_template=template)
            session.messages = list(request.messages[:-1])
            yield from session.send(request.messages[-1]["content"])
