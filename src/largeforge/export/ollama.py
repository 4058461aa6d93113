"""Export for Ollama: a directory with `model.gguf` and a `Modelfile`.

The Modelfile's `TEMPLATE` is the model's chat template written in Ollama's Go template syntax
(`text/template` over `.Messages`, each with `.Role` and `.Content`). Ollama has no Jinja, so
the known templates are translated by hand, one Go template per built-in template of
`largeforge.chat_templates` (the table is `export.ollama_templates`), found by the template's
text or by what it renders. Each renders a conversation to the
same text as the Jinja template with `add_generation_prompt=True` (the tests render both, the Go
one with Go's real `text/template`), with two differences Go cannot avoid:

- Ollama has no `trim`, so the Llama 2 and Llama 3 templates use message contents as they are
  (the Jinja ones trim surrounding whitespace);
- a conversation ending with an assistant message is left open for the model to continue (as
  Ollama's own templates do: a "prefill"), rather than closed and followed by a new cue.

Ollama tokenises the rendered text with special tokens parsed and adds BOS only when the GGUF
says so; the Go templates write every BOS the Jinja one writes, and the GGUF's `add_bos_token`
is set the way `largeforge chat` encodes a prompt (BOS only when the tokenizer adds one and the
template did not write it), so Ollama feeds the model the same tokens as `largeforge chat`.

A model without a chat template gets the plain completion template `{{ .Prompt }}`; an unknown
Jinja template is an error (name a built-in with `chat_template=`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from largeforge.chat_templates import BUILTIN_TEMPLATES, builtin_name, render, tokenizer_adds_bos
from largeforge.errors import LargeForgeError
from largeforge.export.gguf import check_dtype, load_fp32, write_gguf
from largeforge.export.gguf_quantize import K_QUANTS, report_path, require_llama_cpp
from largeforge.inference.sampling import SamplingParams
from largeforge.ollama_templates import (
    BOS,
    DEFAULT_SYSTEM,
    EOS,
    GO_TEMPLATES,
    PLAIN_TEMPLATE,
    STOPS,
)

GGUF_NAME = "model.gguf"
MODELFILE_NAME = "Modelfile"
REPORT_NAME = report_path(Path(GGUF_NAME)).name  # the perplexity of a quantised model.gguf


@dataclass
class OllamaTemplate:
    """A chat template in Ollama's terms."""

    name: str | None  # the built-in it was recognised as; None for plain completion
    template: str
    stops: list[str]
    system: str | None
    writes_bos: bool  # whether the rendered text starts with BOS


def template_name(jinja: str) -> str | None:
    """The built-in template `jinja` is (compared without surrounding whitespace), or None."""
    text = jinja.strip()
    for name, builtin in BUILTIN_TEMPLATES.items():
        if builtin.strip() == text:
            return name
    return None


# Conversations a template is tried on to tell which built-in it writes like.
_PROBES: tuple[list[dict[str, str]], ...] = (
    [{"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "How are you?"}],
)
_SYSTEM_SLOT = "\x00SYSTEM\x00"


def _renders(tokenizer: Any, template: str, messages: list[dict[str, str]]) -> str | None:
    try:
        return render(tokenizer, messages, template, add_generation_prompt=True)
    except LargeForgeError:
        return None


def _default_system(tokenizer: Any, jinja: str, builtin: str,
                    messages: list[dict[str, str]]) -> str | None:
    """The system prompt `jinja` writes when the conversation has none, if that is all that
    tells it from `builtin` on `messages` (None when it differs in any other way)."""
    target = _renders(tokenizer, jinja, messages)
    slotted = _renders(tokenizer, builtin, [{"role": "system", "content": _SYSTEM_SLOT},
                                            *messages])
    if target is None or slotted is None or slotted.count(_SYSTEM_SLOT) != 1:
        return None
    before, after = slotted.split(_SYSTEM_SLOT)
    if not (target.startswith(before) and target.endswith(after)
            and len(target) >= len(before) + len(after)):
        return None
    system = target[len(before): len(target) - len(after)]
    with_system = [{"role": "system", "content": system}, *messages]
    return system if _renders(tokenizer, builtin, with_system) == target else None


def equivalent_builtin(tokenizer: Any, jinja: str) -> tuple[str, str | None] | None:
    """(built-in name, default system prompt or None) for a template that renders every probe
    conversation as that built-in does, with or without a system message; a template that adds
    its own system prompt when there is none (as SmolLM2's ChatML does) is the built-in with
    that prompt as Ollama's SYSTEM. None when no built-in writes the same text."""
    name = template_name(jinja)
    if name is not None:
        return name, DEFAULT_SYSTEM.get(name)
    for name, builtin in BUILTIN_TEMPLATES.items():
        with_system = [[{"role": "system", "content": "Be brief."}, *probe] for probe in _PROBES]
        if any(_renders(tokenizer, jinja, m) != _renders(tokenizer, builtin, m)
               or _renders(tokenizer, jinja, m) is None for m in with_system):
            continue
        if all(_renders(tokenizer, jinja, m) == _renders(tokenizer, builtin, m)
               for m in _PROBES):
            return name, DEFAULT_SYSTEM.get(name)
        systems = {_default_system(tokenizer, jinja, builtin, m) for m in _PROBES}
        if len(systems) == 1 and None not in systems:
            return name, systems.pop()
    return None


def ollama_template(tokenizer: Any, jinja: str | None) -> OllamaTemplate:
    """Translate a Jinja chat template (None: the model has none) for Ollama."""
    if jinja is None:
        return OllamaTemplate(None, PLAIN_TEMPLATE, [], None, writes_bos=False)
    found = equivalent_builtin(tokenizer, jinja)
    if found is None:
        raise LargeForgeError(
            "the model's chat template writes conversations unlike any of LargeForge's "
            "built-in templates, and Ollama needs it in Go template syntax, which is only known "
            f"for those; export with chat_template set to one of {', '.join(BUILTIN_TEMPLATES)}"
        )
    name, system = found
    bos = tokenizer.bos_token or ""
    eos = tokenizer.eos_token or ""
    template = GO_TEMPLATES[name].replace(BOS, bos).replace(EOS, eos)
    stops = [stop.replace(EOS, eos) for stop in STOPS[name]]
    probe = [{"role": "user", "content": "x"}]
    first = render(tokenizer, probe, jinja, add_generation_prompt=True)
    return OllamaTemplate(
        name=name,
        template=template,
        stops=[s for s in dict.fromkeys(stops) if s],
        system=system,
        writes_bos=bool(bos) and first.startswith(bos),
    )


def _quoted(text: str) -> str:
    if '"""' in text:
        raise LargeForgeError(f'cannot write {text[:40]!r}... in a Modelfile: it holds """')
    return f'"""{text}"""'


def _parameter_value(value: str) -> str:
    # Ollama reads a PARAMETER value up to the end of the line; quoted, it may hold spaces.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(
    translated: OllamaTemplate,
    *,
    context_length: int | None,
    temperature: float | None = None,
    gguf_name: str = GGUF_NAME,
) -> str:
    """The Modelfile for a GGUF next to it and a translated template."""
    if temperature is None:
        temperature = SamplingParams().temperature  # what `largeforge generate` uses
    lines = [f"FROM ./{gguf_name}", "", f"TEMPLATE {_quoted(translated.template)}"]
    if translated.system is not None:
        lines.append(f"SYSTEM {_quoted(translated.system)}")
    lines.append("")
    lines += [f"PARAMETER stop {_parameter_value(stop)}" for stop in translated.stops]
    lines.append(f"PARAMETER temperature {temperature:g}")
    if context_length:
        lines.append(f"PARAMETER num_ctx {int(context_length)}")
    return "\n".join(lines) + "\n"


def export_ollama(
    model_ref: str | Path,
    output: Path,
    *,
    dtype: str = "q8_0",
    chat_template: str | None = None,
    temperature: float | None = None,
    overwrite: bool = False,
    eval_text: str | None = None,
) -> Path:
    """Write `output/model.gguf` and `output/Modelfile` for `ollama create NAME -f Modelfile`.

    `chat_template` (a built-in name) replaces the model's own template, in the Modelfile and
    in the GGUF. `output` may be new, empty or a previous export (only those two files); a
    directory holding anything else is replaced whole only with `overwrite`. The export is
    staged beside `output` and renamed into place, and nothing is written when a check fails.
    `dtype` takes every GGUF type; a quantised one adds `model.perplexity.json` (measured on
    `eval_text`, see `largeforge.export.gguf_quantize`).
    """
    from largeforge.chat_templates import get_template
    from largeforge.staging import staged_output

    check_dtype(dtype)
    if dtype in K_QUANTS:
        require_llama_cpp(dtype)
    output = Path(output).expanduser()
    _check_output_dir(output, overwrite)
    if chat_template is not None and builtin_name(chat_template) is None:
        raise LargeForgeError(
            f"unknown chat template {chat_template!r} for Ollama; expected one of "
            f"{', '.join(BUILTIN_TEMPLATES)}"
        )
    model, tokenizer = load_fp32(model_ref)
    jinja = get_template(chat_template) if chat_template else _own_template(tokenizer)
    translated = ollama_template(tokenizer, jinja)
    if jinja is None:
        add_bos = None  # plain completion: as `largeforge generate` encodes a prompt
    else:
        add_bos = tokenizer_adds_bos(tokenizer) and not translated.writes_bos
    modelfile = modelfile_text(
        translated,
        context_length=getattr(model.config, "max_position_embeddings", None),
        temperature=temperature,
    )
    with staged_output(output, overwrite=True) as staging:  # checked above
        write_gguf(model, tokenizer, staging / GGUF_NAME, dtype=dtype, add_bos=add_bos,
                   chat_template=jinja, eval_text=eval_text)
        (staging / MODELFILE_NAME).write_text(modelfile, encoding="utf-8")
    return output


def _own_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return template or None


def _check_output_dir(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise LargeForgeError(f"Ollama output {output} is a file; give a directory")
    if output.is_dir() and not overwrite:
        others = sorted(p.name for p in output.iterdir()
                        if p.name not in (GGUF_NAME, MODELFILE_NAME, REPORT_NAME))
        if others:
            raise LargeForgeError(
                f"Ollama output {output} holds other files ({', '.join(others[:5])}); give an "
                "empty or new directory, or overwrite (--overwrite) to replace it"
            )
