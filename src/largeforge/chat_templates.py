"""Chat templates by name, rendering conversations for training with loss masks, and writing the
training template into a model directory.

Conversations are lists of ``{"role": "system"|"user"|"assistant", "content": str}``. The
built-in templates follow the published prompt formats of their model families (written here
as our own Jinja); each uses ``bos_token`` / ``eos_token`` from the tokenizer where the family
puts them, so the template alone decides where BOS and EOS go:

- ``chatml``: ``<|im_start|>role\\ncontent<|im_end|>\\n`` (Qwen, many fine-tunes), no BOS.
- ``llama-2``: ``<s>[INST] <<SYS>>\\nsystem\\n<</SYS>>\\n\\nuser [/INST] answer </s>``.
- ``llama-3``: ``<|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>``.
- ``alpaca``: a preamble (or the system message), ``### Instruction:`` and ``### Response:``
  blocks, the response ended by EOS.
- ``mistral``: ``<s>[INST] user[/INST] answer</s>`` (tokenizer v3 spacing); the system message
  is put before the first user message.
- ``phi-3``: ``<|role|>\\ncontent<|end|>\\n``.
- ``zephyr``: ``<|role|>\\ncontent</s>\\n``.

`render_for_training` returns token ids and labels in which only the assistant turns (their
content and the turn's end marker) are targets. The rendered text is encoded without the
tokenizer's own special tokens, so nothing the template already wrote is added twice; BOS is
prepended only when the tokenizer expects one and the template did not write it.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

from largeforge.errors import LargeForgeError

IGNORE_INDEX = -100

Message = dict[str, str]

CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- endif -%}"
)

LLAMA_2 = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = '<<SYS>>\\n' + messages[0]['content'] | trim + '\\n<</SYS>>\\n\\n' -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '' -%}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set text = (system if loop.first else '') + message['content'] | trim -%}"
    "{{ bos_token + '[INST] ' + text + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{%- else -%}"
    "{{ raise_exception('llama-2 turns must be user or assistant after the system message') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

LLAMA_3 = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif -%}"
)

ALPACA = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ messages[0]['content'] + '\\n\\n' }}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{{ 'Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\\n\\n' }}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{%- else -%}"
    "{{ raise_exception('alpaca turns must be user or assistant after the system message') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '### Response:\\n' }}"
    "{%- endif -%}"
)

MISTRAL = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '' -%}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in turns -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ ' ' + message['content'] + eos_token }}"
    "{%- else -%}"
    "{{ raise_exception('mistral turns must be user or assistant after the system message') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

PHI_3 = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|assistant|>\\n' }}"
    "{%- endif -%}"
)

ZEPHYR = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|assistant|>\\n' }}"
    "{%- endif -%}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": CHATML,
    "llama-2": LLAMA_2,
    "llama-3": LLAMA_3,
    "alpaca": ALPACA,
    "mistral": MISTRAL,
    "phi-3": PHI_3,
    "zephyr": ZEPHYR,
}

_ALIASES = {"llama2": "llama-2", "llama3": "llama-3", "phi3": "phi-3"}


def builtin_name(name: str) -> str | None:
    """The canonical built-in name for `name` (case, `_` and aliases forgiven), else None."""
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    return key if key in BUILTIN_TEMPLATES else None


def get_template(name_or_path: str | Path | None, tokenizer: Any = None) -> str:
    """A built-in template by name, the text of a Jinja file, or (None) the tokenizer's own."""
    if name_or_path is None:
        own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if not own:
            raise LargeForgeError(
                "the tokenizer has no chat template; name one of "
                f"{', '.join(BUILTIN_TEMPLATES)} or give a Jinja file"
            )
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default") or next(iter(own.values()))
        return str(own)
    spec = str(name_or_path)
    name = builtin_name(spec)
    if name is not None:
        return BUILTIN_TEMPLATES[name]
    path = Path(spec).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise LargeForgeError(f"chat template file {path} is empty")
        return text
    raise LargeForgeError(
        f"unknown chat template {spec!r}: not a built-in ({', '.join(BUILTIN_TEMPLATES)}) "
        "nor an existing Jinja file"
    )


def render(
    tokenizer: Any, messages: list[Message], template: str, *, add_generation_prompt: bool = False
) -> str:
    """The conversation as text, as the template writes it."""
    try:
        text = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as exc:  # jinja2 errors: a template that rejects these messages
        raise LargeForgeError(f"the chat template failed on this conversation: {exc}") from exc
    return str(text)


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS in front of text it encodes with special tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def assistant_spans(
    tokenizer: Any, messages: list[Message], template: str
) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the character spans of the assistant turns in it.

    A turn's span starts where the prompt for it (the conversation before it plus the
    generation cue) ends, and ends where the conversation up to and including it ends, so it
    covers the reply and the template's end-of-turn marker (and EOS where the template writes
    one). Each prefix must render as a prefix of the full text."""
    full = render(tokenizer, messages, template)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise LargeForgeError(
                "the conversation starts with an assistant turn; it must start with a system or "
                "user message"
            )
        prompt = render(tokenizer, messages[:i], template, add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1], template)
        if not (full.startswith(upto) and upto.startswith(prompt)):
            raise LargeForgeError(
                "the chat template does not render a conversation's beginning as the beginning "
                "of the whole, so assistant turns cannot be located for the loss mask; use a "
                f"built-in template ({', '.join(BUILTIN_TEMPLATES)})"
            )
        if len(upto) > len(prompt):
            spans.append((len(prompt), len(upto)))
    return full, spans


def render_for_training(
    tokenizer: Any,
    messages: list[Message],
    template: str,
    *,
    train_on_prompt: bool = False,
    max_length: int | None = None,
    last_turns: int | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids and labels for one conversation; labels are -100 outside assistant turns
    (everywhere a target with `train_on_prompt`; only in the last `last_turns` assistant turns
    when given, as preference pairs need). Labels are aligned with the ids (the model shifts
    them). Longer than `max_length` tokens: cut at the end."""
    text, spans = assistant_spans(tokenizer, messages, template)
    spans = spans[-last_turns:] if last_turns else spans
    input_ids, labels = _bos_prefix(tokenizer, text, train_on_prompt, tokenizer_adds_bos(tokenizer))
    if getattr(tokenizer, "is_fast", False):
        # The whole text in one encoding (the ids `apply_chat_template(tokenize=True)` gives);
        # a token is a target when its characters overlap an assistant span.
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        _add_targets(input_ids, labels, encoded["input_ids"], encoded["offset_mapping"], spans,
                     train_on_prompt)
    else:
        # No offsets: encode piece by piece at the span boundaries.
        cuts = sorted({0, len(text), *(c for span in spans for c in span)})
        targets = {start for start, _ in spans}
        for start, end in pairwise(cuts):
            ids = tokenizer(text[start:end], add_special_tokens=False)["input_ids"]
            target = train_on_prompt or start in targets
            input_ids.extend(int(t) for t in ids)
            labels.extend(int(t) if target else IGNORE_INDEX for t in ids)
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return input_ids, labels


def render_batch_for_training(
    tokenizer: Any,
    conversations: list[list[Message]],
    template: str,
    *,
    train_on_prompt: bool = False,
    max_length: int | None = None,
    last_turns: int | None = None,
) -> list[tuple[list[int], list[int]]]:
    """`render_for_training` for many conversations, with one batched encoding (the Rust
    tokenizer then works on all texts at once); the same ids and labels, conversation by
    conversation."""
    if not getattr(tokenizer, "is_fast", False):
        return [render_for_training(tokenizer, m, template, train_on_prompt=train_on_prompt,
                                    max_length=max_length, last_turns=last_turns)
                for m in conversations]
    rendered = []
    for messages in conversations:
        text, spans = assistant_spans(tokenizer, messages, template)
        rendered.append((text, spans[-last_turns:] if last_turns else spans))
    encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False,
                        return_offsets_mapping=True)
    out = []
    adds_bos = tokenizer_adds_bos(tokenizer)
    for (text, spans), ids, offsets in zip(
        rendered, encoded["input_ids"], encoded["offset_mapping"], strict=True
    ):
        input_ids, labels = _bos_prefix(tokenizer, text, train_on_prompt, adds_bos)
        _add_targets(input_ids, labels, ids, offsets, spans, train_on_prompt)
        if max_length is not None:
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        out.append((input_ids, labels))
    return out


def _bos_prefix(
    tokenizer: Any, text: str, train_on_prompt: bool, adds_bos: bool
) -> tuple[list[int], list[int]]:
    """BOS when the tokenizer expects one and the template did not write it; else nothing."""
    bos_token = getattr(tokenizer, "bos_token", None)
    if adds_bos and not (bos_token and text.startswith(bos_token)):
        bos = int(tokenizer.bos_token_id)
        return [bos], [bos if train_on_prompt else IGNORE_INDEX]
    return [], []


def _add_targets(
    input_ids: list[int],
    labels: list[int],
    ids: list[int],
    offsets: list[tuple[int, int]],
    spans: list[tuple[int, int]],
    train_on_prompt: bool,
) -> None:
    # Offsets rise through the text and spans are sorted and disjoint: one pointer suffices.
    current = 0
    for token, (start, end) in zip(ids, offsets, strict=True):
        while current < len(spans) and spans[current][1] <= start:
            current += 1
        target = train_on_prompt or (
            current < len(spans) and start < spans[current][1] and end > spans[current][0]
        )
        input_ids.append(int(token))
        labels.append(int(token) if target else IGNORE_INDEX)


def save_chat_template(tokenizer: Any, template: str, directory: str | Path) -> None:
    """Write the tokenizer with `template` as its chat template into `directory` (transformers
    stores it as `chat_template.jinja`), so `AutoTokenizer.from_pretrained(directory)` and
    `generate`, `chat` and exports all render conversations the same way."""
    tokenizer.chat_template = template
    Path(directory).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
