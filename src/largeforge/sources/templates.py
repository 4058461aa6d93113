"""Ollama's chat template and parameters in Hugging Face terms.

The chat template: `largeforge export --format ollama` writes each of our built-in Jinja
templates as a fixed Go template (`largeforge.ollama_templates.GO_TEMPLATES`, with the
tokenizer's BOS and EOS strings in place of stand-ins). An Ollama template that is one of those,
filled in with this model's BOS and EOS, maps back to the built-in Jinja template exactly (compared
without surrounding whitespace). Anything else (Ollama's own library templates) is not
translated: the GGUF's own `tokenizer.chat_template` is used instead.

The parameters (a JSON object in Ollama's params layer) map to `generation_config.json` fields:
temperature, top_p, top_k, min_p, typical_p, repeat_penalty (-> repetition_penalty) and
num_predict (-> max_new_tokens, when positive). A stop string that is one special token of the
vocabulary joins `eos_token_id`; the others go to `stop_strings`. Parameters that describe the
runtime rather than sampling (num_ctx, num_gpu, seed, mirostat...) have no field there and are
kept only in `import_info.json`.
"""

from __future__ import annotations

from typing import Any

from largeforge.chat_templates import BUILTIN_TEMPLATES
from largeforge.ollama_templates import BOS, EOS, GO_TEMPLATES, PLAIN_TEMPLATE

# Ollama parameter -> GenerationConfig field, for those that mean the same thing.
SAMPLING_PARAMS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "repeat_penalty": "repetition_penalty",
}


def builtin_for_go_template(go_template: str, bos: str | None, eos: str | None) -> str | None:
    """The name of the built-in template whose Go translation is `go_template`, or None."""
    text = go_template.strip()
    for name, template in GO_TEMPLATES.items():
        if template.replace(BOS, bos or "").replace(EOS, eos or "").strip() == text:
            return name
    return None


def chat_template_for(go_template: str | None, gguf_template: str | None, bos: str | None,
                      eos: str | None) -> tuple[str | None, str]:
    """(Jinja chat template, where it came from): the built-in one an Ollama template maps to,
    else the GGUF's own (None when it has none)."""
    if go_template is not None and go_template.strip() != PLAIN_TEMPLATE:
        name = builtin_for_go_template(go_template, bos, eos)
        if name is not None:
            return BUILTIN_TEMPLATES[name], f"ollama template = built-in {name!r}"
    if gguf_template:
        return gguf_template, "the GGUF's tokenizer.chat_template"
    return None, "none"


def generation_settings(params: dict[str, Any], end_token_ids: list[int],
                        special_tokens: dict[str, int]) -> dict[str, Any]:
    """`generation_config.json` fields from Ollama parameters and the GGUF's end tokens.

    `special_tokens` maps the vocabulary's special token strings to their ids."""
    settings: dict[str, Any] = {}
    for ollama_name, field in SAMPLING_PARAMS.items():
        value = params.get(ollama_name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            settings[field] = value
    predict = params.get("num_predict")
    if isinstance(predict, int) and predict > 0:
        settings["max_new_tokens"] = predict
    eos_ids = list(end_token_ids)
    stops = params.get("stop") or []
    stops = [stops] if isinstance(stops, str) else [s for s in stops if isinstance(s, str) and s]
    stop_strings = []
    for stop in stops:
        if stop in special_tokens:
            eos_ids.append(special_tokens[stop])
        else:
            stop_strings.append(stop)
    eos_ids = list(dict.fromkeys(eos_ids))
    if eos_ids:
        settings["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if stop_strings:
        settings["stop_strings"] = stop_strings
    if "temperature" in settings:
        settings["do_sample"] = settings["temperature"] > 0
        if not settings["do_sample"]:  # greedy: the sampling fields would only draw warnings
            for field in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
                settings.pop(field, None)
    return settings
