"""Ollama's chat templates in Go template syntax, one per built-in template of
`largeforge.chat_templates`, with the stop strings and default system prompts that go with them.

A table only (no torch, no model code), so both the Ollama export (`export.ollama`, Jinja -> Go)
and the Ollama import (`sources.templates`, Go -> Jinja) read it without importing each other.
See `export.ollama` for how each one renders like its Jinja template.
"""

from __future__ import annotations

# Stand-ins for the tokenizer's BOS and EOS strings, filled in per model.
BOS, EOS = "\x00BOS\x00", "\x00EOS\x00"

# `$last` is true on the last message: Go templates cannot subtract, so it is "one message
# from here to the end".
_LAST = "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
_IS_FIRST_AFTER_SYSTEM = '(and (eq $i 1) (eq (index $.Messages 0).Role "system"))'

_ROLE_BLOCKS = {
    # <start><role><sep>content<end>, then the assistant cue after a last non-assistant turn.
    "chatml": ("<|im_start|>", "\n", "<|im_end|>\n", "<|im_start|>assistant\n"),
    "phi-3": ("<|", "|>\n", "<|end|>\n", "<|assistant|>\n"),
    "zephyr": ("<|", "|>\n", EOS + "\n", "<|assistant|>\n"),
    "llama-3": ("<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>",
                "<|start_header_id|>assistant<|end_header_id|>\n\n"),
}


def _role_block_template(start: str, sep: str, end: str, cue: str, bos: bool) -> str:
    return (
        (BOS if bos else "")
        + "{{- range $i, $m := .Messages }}" + _LAST
        + start + "{{ $m.Role }}" + sep + "{{ $m.Content }}"
        + '{{ if or (ne $m.Role "assistant") (not $last) }}' + end + "{{ end }}"
        + '{{ if and $last (ne $m.Role "assistant") }}' + cue + "{{ end }}"
        + "{{- end }}"
    )


ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request."
)

_ALPACA = (
    '{{- if not (and .Messages (eq (index .Messages 0).Role "system")) }}'
    + ALPACA_PREAMBLE + "\n\n{{ end }}"
    + "{{- range $i, $m := .Messages }}" + _LAST
    + '{{ if eq $m.Role "system" }}{{ if eq $i 0 }}{{ $m.Content }}\n\n{{ end }}'
    + '{{ else if eq $m.Role "user" }}### Instruction:\n{{ $m.Content }}\n\n'
    + '{{ else if eq $m.Role "assistant" }}### Response:\n{{ $m.Content }}'
    + "{{ if not $last }}" + EOS + "\n\n{{ end }}{{ end }}"
    + '{{ if and $last (ne $m.Role "assistant") }}### Response:\n{{ end }}'
    + "{{- end }}"
)

_LLAMA_2 = (
    "{{- range $i, $m := .Messages }}" + _LAST
    + '{{ if eq $m.Role "user" }}' + BOS + "[INST] "
    + "{{ if " + _IS_FIRST_AFTER_SYSTEM + " }}"
    + "<<SYS>>\n{{ (index $.Messages 0).Content }}\n<</SYS>>\n\n{{ end }}"
    + "{{ $m.Content }} [/INST]"
    + '{{ else if eq $m.Role "assistant" }} {{ $m.Content }}{{ if not $last }} ' + EOS + "{{ end }}"
    + "{{ end }}"
    + "{{- end }}"
)

_MISTRAL = (
    BOS + "{{- range $i, $m := .Messages }}" + _LAST
    + '{{ if eq $m.Role "user" }}[INST] '
    + "{{ if " + _IS_FIRST_AFTER_SYSTEM + " }}{{ (index $.Messages 0).Content }}\n\n{{ end }}"
    + "{{ $m.Content }}[/INST]"
    + '{{ else if eq $m.Role "assistant" }} {{ $m.Content }}{{ if not $last }}' + EOS + "{{ end }}"
    + "{{ end }}"
    + "{{- end }}"
)

GO_TEMPLATES: dict[str, str] = {
    "chatml": _role_block_template(*_ROLE_BLOCKS["chatml"], bos=False),
    "phi-3": _role_block_template(*_ROLE_BLOCKS["phi-3"], bos=False),
    "zephyr": _role_block_template(*_ROLE_BLOCKS["zephyr"], bos=False),
    "llama-3": _role_block_template(*_ROLE_BLOCKS["llama-3"], bos=True),
    "alpaca": _ALPACA,
    "llama-2": _LLAMA_2,
    "mistral": _MISTRAL,
}

# Where the model's turn ends, and where the next user turn would start: generation stops at
# either (EOS stops llama.cpp by itself too, but as text it also catches a spelled-out one).
STOPS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_end|>", "<|im_start|>"),
    "phi-3": ("<|end|>", "<|user|>"),
    "zephyr": (EOS, "<|user|>"),
    "llama-3": ("<|eot_id|>", "<|start_header_id|>"),
    "alpaca": (EOS, "### Instruction:"),
    "llama-2": (EOS, "[INST]"),
    "mistral": (EOS, "[INST]"),
}

# A system prompt the template uses when the conversation has none.
DEFAULT_SYSTEM: dict[str, str] = {"alpaca": ALPACA_PREAMBLE}

PLAIN_TEMPLATE = "{{ .Prompt }}"
