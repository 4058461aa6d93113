"""Multi-turn chat over a model with a chat template.

The tokenizer's Jinja chat template (or a built-in one from `largeforge.chat_templates`) turns
the conversation into text, encoded without the tokenizer's special tokens; BOS is prepended
only when the tokenizer expects one and the template did not write it, as in training, so BOS is
never doubled. Generation stops at EOS
and at the template's end-of-turn marker: as a token id when the marker is one token, else as
text cut out of the reply.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from largeforge.chat_templates import (
    BUILTIN_TEMPLATES,
    builtin_name,
    get_template,
    tokenizer_adds_bos,
)
from largeforge.errors import LargeForgeError
from largeforge.inference.generate import (
    context_length,
    detokenize_stream,
    encode_prompt,
    generate_ids,
    model_eos_ids,
)
from largeforge.inference.sampling import SamplingParams

# ChatML (as Qwen and many fine-tunes use it), with plain-text markers, so it works with any
# tokenizer: markers that are not single tokens are caught in the decoded text instead.
CHATML_TEMPLATE = BUILTIN_TEMPLATES["chatml"]

# End-of-turn markers of common template families (ChatML, Llama 3, Phi-3, Gemma); the families
# that end turns with EOS (Llama 2, Mistral, Zephyr, Alpaca) stop at the model's EOS.
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")

Message = dict[str, str]


def resolve_chat_template(spec: str) -> str:
    """A built-in template by name (chatml, llama-2, llama-3, alpaca, mistral, phi-3, zephyr);
    anything else is a Jinja file to read."""
    if builtin_name(spec) is not None:
        return get_template(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise LargeForgeError(
            f"chat template {spec!r} is neither 'chatml' nor another built-in "
            f"({', '.join(BUILTIN_TEMPLATES)}) nor an existing Jinja file"
        )
    return get_template(path)


def cut_at_stop_strings(pieces: Iterable[str], stops: Iterable[str]) -> Iterator[str]:
    """Pass text pieces through until one of `stops` appears; the stop text and everything after
    it are dropped and the source is closed (which ends generation). Text that could be the
    start of a stop string is held back until it is clear that it is not."""
    stops = [s for s in stops if s]
    if not stops:
        yield from pieces
        return
    pending = ""
    try:
        for piece in pieces:
            pending += piece
            hits = [i for i in (pending.find(s) for s in stops) if i >= 0]
            if hits:
                if min(hits) > 0:
                    yield pending[: min(hits)]
                return
            keep = _partial_stop_suffix(pending, stops)
            if len(pending) > keep:
                yield pending[: len(pending) - keep]
                pending = pending[len(pending) - keep :]
        if pending:
            yield pending
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()


def _partial_stop_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class ChatSession:
    """A conversation: `send` streams the assistant's reply and remembers both turns."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Any,
        system_prompt: str | None = None,
        params: SamplingParams | None = None,
        *,
        chat_template: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.params = params or SamplingParams()
        # An explicit template wins; the tokenizer object itself is left as it is.
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if not self.chat_template:
            name = (
                getattr(tokenizer, "name_or_path", "")
                or getattr(model.config, "_name_or_path", "")
                or "this model"
            )
            raise LargeForgeError(
                f"model {name} has no chat template; use `largeforge generate`, "
                "or give one with --chat-template FILE (or --chat-template chatml)"
            )
        self.eos_ids, self.stop_strings = self._end_of_turn()
        self.messages: list[Message] = []
        self.reset()

    def _end_of_turn(self) -> tuple[set[int], list[str]]:
        eos = model_eos_ids(self.model, self.tokenizer)
        stops: list[str] = []
        for marker in END_OF_TURN_MARKERS:
            if marker not in self.chat_template:
                continue
            ids = self.tokenizer(marker, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                eos.add(int(ids[0]))
            else:
                stops.append(marker)
        return eos, stops

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = []
        if self.system_prompt:
            self.messages.append({"role": "system", "content": self.system_prompt})

    def prompt_ids(self, messages: list[Message]) -> Any:
        """The token ids [1, seq] the model continues for `messages` plus the assistant cue."""
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.chat_template,
                add_generation_prompt=True,
                tokenize=False,
            )
        except Exception as exc:  # jinja2 errors: a template that rejects these messages
            raise LargeForgeError(f"the chat template failed on this conversation: {exc}") from exc
        # As in training (`render_for_training`): BOS only where the tokenizer expects one and
        # the template did not write it (encode_prompt never doubles one already there).
        return encode_prompt(self.tokenizer, text, add_bos=tokenizer_adds_bos(self.tokenizer))

    def send(self, user_text: str) -> Iterator[str]:
        """Stream the reply to `user_text`; once it is complete, both turns join `messages`."""
        messages = [*self.messages, {"role": "user", "content": user_text}]
        input_ids = self.prompt_ids(messages)
        limit = context_length(self.model)
        if limit is not None and input_ids.size(1) >= limit:
            raise LargeForgeError(
                f"the conversation is {input_ids.size(1)} tokens and fills the model's context "
                f"of {limit} tokens; start over with reset() (/reset in `largeforge chat`)"
            )
        ids = generate_ids(self.model, input_ids, self.params, self.eos_ids)
        reply: list[str] = []
        for piece in cut_at_stop_strings(detokenize_stream(self.tokenizer, ids), self.stop_strings):
            reply.append(piece)
            yield piece
        self.messages = [*messages, {"role": "assistant", "content": "".join(reply)}]
