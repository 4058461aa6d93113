"""`evaluate_model`: perplexity and generation metrics of a model on a data file; `evaluate`:
the whole of `largeforge eval` (data metrics and lm-eval harness tasks, checked, timed, written).

Data is plain text (text files, or JSON/JSONL records with a "text" field: perplexity only) or
instruction/chat data (alpaca, sharegpt, messages). For instruction data, an example's prompt
is every turn before its last assistant turn, rendered with the chat template and the
generation cue exactly as `largeforge chat` renders it; the reference is that last assistant
turn. Everything about the input is checked before the model is loaded, so bad input fails fast.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from largeforge.errors import LargeForgeError

METRICS: tuple[str, ...] = ("perplexity", "rouge", "bleu", "chrf", "exact_match")
GENERATION_METRICS: tuple[str, ...] = ("rouge", "bleu", "chrf", "exact_match")
HIGHER_IS_BETTER: dict[str, bool] = {
    "perplexity": False,
    "loss": False,
    "rouge1": True,
    "rouge2": True,
    "rougeL": True,
    "bleu": True,
    "chrf": True,
    "exact_match": True,
}


@dataclass
class EvalResult:
    model: str  # the reference as given
    data: str
    num_examples: int
    metrics: dict[str, float]
    samples: list[dict[str, str]]  # {"prompt", "reference", "output"} per generated example
    details: dict[str, Any] = field(default_factory=dict)  # counts: tokens scored, cut, skipped

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalData:
    """The examples of a data file: documents (text) or conversations (instruction data)."""

    path: str
    kind: str  # "text" or "instruction"
    format: str  # "text", "alpaca", "sharegpt" or "messages"
    documents: list[str] = field(default_factory=list)
    conversations: list[list[dict[str, str]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.documents) if self.kind == "text" else len(self.conversations)


def parse_metrics(metrics: str | Sequence[str]) -> list[str]:
    """Metric names from a comma-separated string or a sequence, checked, duplicates dropped."""
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    cleaned = [name.strip().lower().replace("-", "_") for name in names if name.strip()]
    if not cleaned:
        raise LargeForgeError(f"no metric given; choose from {', '.join(METRICS)}")
    unknown = [name for name in cleaned if name not in METRICS]
    if unknown:
        raise LargeForgeError(
            f"unknown metric {', '.join(repr(u) for u in unknown)}; valid metrics are "
            f"{', '.join(METRICS)}"
        )
    return list(dict.fromkeys(cleaned))


def load_eval_data(data: str | Path, max_examples: int | None = None) -> EvalData:
    """Read the examples of `data` (at most `max_examples`); an empty input is an error."""
    from largeforge.data.instruct_data import data_kind, load_conversations
    from largeforge.data.sources import JSON_SUFFIXES, TEXT_SUFFIXES

    path = Path(data).expanduser()
    if not path.exists():
        raise LargeForgeError(f"data file not found: {data}")
    if max_examples is not None and max_examples < 1:
        raise LargeForgeError(f"max_examples must be >= 1, got {max_examples}")
    if _is_empty(path):
        raise LargeForgeError(f"{data} is empty: no examples to evaluate on")
    try:
        kind = data_kind([str(path)])
    except LargeForgeError as exc:
        if not str(exc).startswith("this is preference data"):
            raise
        raise LargeForgeError(
            f"{data} holds preference pairs (prompt/chosen/rejected); eval needs plain text or "
            "instruction/chat records (alpaca, sharegpt, messages)"
        ) from None
    if kind == "pretrain":
        if path.is_dir() or path.suffix.lower() in TEXT_SUFFIXES + JSON_SUFFIXES:
            from largeforge.data.sources import iter_documents, resolve_sources

            documents = list(islice(iter_documents(resolve_sources([str(path)])), max_examples))
        else:  # CSV, Parquet, saved datasets: through the record readers
            from largeforge.data.formats import load_records

            texts = load_records([str(path)], "text").dataset["text"]
            documents = [t for t in islice(texts, max_examples) if t.strip()]
        if not documents:
            raise LargeForgeError(f"{data} holds no non-empty text to evaluate on")
        return EvalData(str(data), "text", "text", documents=documents)
    fmt, conversations = load_conversations([str(path)])
    conversations = conversations[:max_examples] if max_examples else conversations
    if not conversations:
        raise LargeForgeError(f"{data} holds no conversation to evaluate on")
    return EvalData(str(data), "instruction", fmt, conversations=conversations)


def _is_empty(path: Path) -> bool:
    """A file holding nothing but whitespace, an empty JSON array or an empty object."""
    if not path.is_file() or path.stat().st_size > 1 << 16:
        return False
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return False  # the readers report the bad byte
    return "".join(text.split()) in ("", "[]", "{}")


def eval_template(tokenizer: Any, fmt: str, chat_template: str | None = None) -> str:
    """The chat template to render conversations with, chosen as training chooses it for an
    existing model (`training.setup.default_template`): the one given, else the tokenizer's
    own, else the Alpaca format for alpaca data; anything else needs one named."""
    from largeforge.chat_templates import BUILTIN_TEMPLATES, get_template

    if chat_template:
        return get_template(chat_template)
    if getattr(tokenizer, "chat_template", None):
        return get_template(None, tokenizer)
    if fmt == "alpaca":
        return get_template("alpaca")
    raise LargeForgeError(
        f"the model has no chat template, and {fmt} data is rendered through one: give "
        f"--chat-template with a built-in name ({', '.join(BUILTIN_TEMPLATES)}) or a Jinja file"
    )


def split_for_generation(
    conversations: Sequence[list[dict[str, str]]],
) -> tuple[list[list[dict[str, str]]], list[str], int]:
    """(prompt turns, reference) per conversation: the turns before the last assistant turn
    and that turn's text. Conversations with no assistant turn after a first message are
    counted (third value) and left out."""
    prompts: list[list[dict[str, str]]] = []
    references: list[str] = []
    skipped = 0
    for messages in conversations:
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=0)
        if last == 0:
            skipped += 1
            continue
        prompts.append(list(messages[:last]))
        references.append(messages[last]["content"])
    return prompts, references, skipped


def _fit_prompt(ids: list[int], limit: int | None, max_new_tokens: int) -> tuple[list[int], bool]:
    """Cut a prompt from the left so that it leaves room to answer in the context: at least
    `max_new_tokens` or half the context, whichever is less. Returns (ids, whether cut)."""
    if limit is None:
        return ids, False
    room = max(1, min(max_new_tokens, limit // 2))
    keep = limit - room
    return (ids[-keep:], True) if len(ids) > keep else (ids, False)


def _check_device(device: str) -> None:
    # Checked by name, so a typo fails before torch is even imported.
    if not re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", device):
        raise LargeForgeError(f"unknown device {device!r}; use auto, cpu, cuda (cuda:N) or mps")


def _load(model: Any, device: str) -> tuple[Any, Any, str]:
    if isinstance(model, tuple):
        loaded, tokenizer = model
        name = getattr(loaded.config, "_name_or_path", "") or type(loaded).__name__
        return loaded, tokenizer, str(name)
    from largeforge.inference.generate import load_for_inference
    from largeforge.runs import resolve_model_dir

    resolve_model_dir(model)  # a missing model is reported before any loading starts
    loaded, tokenizer = load_for_inference(model, None if device == "auto" else device)
    return loaded, tokenizer, str(model)


def check_eval_inputs(
    data: str | Path,
    metrics: str | Sequence[str],
    *,
    max_examples: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    chat_template: str | None = None,
) -> tuple[list[str], EvalData]:
    """Everything `evaluate_model` checks before it loads a model: the metric names, the
    device, the batch size, the data (read) and that it suits the metrics, the template name.
    Returns the metric names and the examples."""
    names = parse_metrics(metrics)
    _check_device(device)
    if batch_size < 1:
        raise LargeForgeError(f"batch_size must be >= 1, got {batch_size}")
    generation = [name for name in names if name in GENERATION_METRICS]
    examples = load_eval_data(data, max_examples)
    if generation and examples.kind == "text":
        raise LargeForgeError(
            f"{data} is plain text; generation metrics ({', '.join(generation)}) need "
            "prompt/response records (alpaca, sharegpt or messages); on text, use "
            "--metrics perplexity"
        )
    if chat_template and examples.kind == "instruction":
        from largeforge.chat_templates import get_template

        get_template(chat_template)
    return names, examples


def evaluate_model(
    model: str | Path | tuple[Any, Any],
    data: str | Path,
    metrics: Sequence[str] = ("perplexity",),
    *,
    max_examples: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    temperature: float = 0.0,
    device: str = "auto",
    seed: int = 0,
    chat_template: str | None = None,
    stride: int | None = None,
) -> EvalResult:
    """Evaluate `model` (a model dir, run dir, LoRA adapter dir, hub id, or a loaded
    (model, tokenizer) pair) on `data` with `metrics` (names from METRICS).

    Perplexity is token-weighted over the text (sliding windows of the model's context moved by
    `stride`, default half of it) or over the assistant tokens of instruction data. Generation
    metrics need instruction data: each prompt is answered (greedy at temperature 0, else
    sampled with `seed`) in batches of `batch_size`, up to `max_new_tokens` tokens.
    `chat_template` overrides the tokenizer's template (a built-in name or a Jinja file).
    """
    names, examples = check_eval_inputs(data, metrics, max_examples=max_examples,
                                        batch_size=batch_size, device=device,
                                        chat_template=chat_template)
    generation = [name for name in names if name in GENERATION_METRICS]
    from largeforge.inference.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    loaded, tokenizer, model_name = _load(model, device)

    result = EvalResult(model_name, str(data), len(examples), {}, [],
                        {"data_kind": examples.kind, "format": examples.format})
    template = None
    if examples.kind == "instruction":
        template = eval_template(tokenizer, examples.format, chat_template)
    if "perplexity" in names:
        _add_perplexity(result, loaded, tokenizer, examples, template, batch_size, stride)
    if generation:
        assert template is not None
        _add_generation(result, loaded, tokenizer, examples, template, generation, params,
                        batch_size)
    return result


def _add_perplexity(
    result: EvalResult, model: Any, tokenizer: Any, examples: EvalData, template: str | None,
    batch_size: int, stride: int | None,
) -> None:
    from largeforge.evaluation.perplexity import instruction_perplexity, text_perplexity

    if examples.kind == "text":
        ppl = text_perplexity(model, tokenizer, examples.documents, stride=stride,
                              batch_size=batch_size)
    else:
        assert template is not None
        ppl = instruction_perplexity(model, tokenizer, examples.conversations, template,
                                     batch_size=batch_size)
        result.details["perplexity_truncated"] = ppl.truncated
        result.details["perplexity_skipped"] = ppl.skipped
    result.metrics["perplexity"] = ppl.perplexity
    result.metrics["loss"] = ppl.loss
    result.details["perplexity_tokens"] = ppl.tokens


def _add_generation(
    result: EvalResult, model: Any, tokenizer: Any, examples: EvalData, template: str,
    names: list[str], params: Any, batch_size: int,
) -> None:
    from largeforge.evaluation.metrics import generation_metrics
    from largeforge.inference.batched_generation import generate_batch
    from largeforge.inference.chat import ChatSession
    from largeforge.inference.generate import context_length

    turns, references, skipped = split_for_generation(examples.conversations)
    if not turns:
        raise LargeForgeError(
            f"no conversation in {examples.path} has an assistant turn to compare with"
        )
    # The chat session renders prompts and finds the end-of-turn markers as `largeforge chat`
    # does, so an answer here is the answer a user would see there.
    session = ChatSession(model, tokenizer, params=params, chat_template=template)
    limit = context_length(model)
    prompts: list[list[int]] = []
    cut = 0
    for messages in turns:
        ids, was_cut = _fit_prompt(session.prompt_ids(messages)[0].tolist(), limit,
                                   params.max_new_tokens)
        prompts.append(ids)
        cut += was_cut
    outputs = generate_batch(model, tokenizer, prompts, params, batch_size=batch_size,
                             eos_token_ids=session.eos_ids, stop_strings=session.stop_strings)
    result.metrics.update(generation_metrics(names, outputs, references))
    result.details["generated"] = len(outputs)
    result.details["generation_skipped"] = skipped
    result.details["prompts_truncated"] = cut
    result.samples = [
        {"prompt": tokenizer.decode(ids), "reference": reference, "output": output}
        for ids, reference, output in zip(prompts, references, outputs, strict=True)
    ]


def notes(result: EvalResult) -> list[str]:
    """What was cut or left out, in words (empty when nothing was)."""
    d = result.details
    said = {
        "perplexity_truncated": "conversation(s) longer than the context cut at its end for "
                                "perplexity",
        "perplexity_skipped": "conversation(s) without an assistant token left out of "
                              "perplexity",
        "generation_skipped": "conversation(s) without an assistant turn to compare with left "
                              "out of the generation metrics",
        "prompts_truncated": "prompt(s) cut from the left to leave room for the answer in the "
                             "context",
    }
    return [f"{d[key]} {text}" for key, text in said.items() if d.get(key)]


# --- results files -------------------------------------------------------------------------------


def versions() -> dict[str, str | None]:
    """Versions of what produced the numbers."""
    import platform

    from largeforge.hardware import installed_version
    from largeforge.version import __version__

    return {
        "largeforge": __version__,
        "python": platform.python_version(),
        **{name: installed_version(name) for name in (
            "torch", "transformers", "peft", "rouge-score", "sacrebleu", "lm-eval")},
    }


def results_document(
    result: EvalResult | None,
    *,
    model: str,
    data: str | None,
    settings: dict[str, Any],
    tasks: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """What `largeforge eval --output` writes: the result (or an empty one when only harness
    tasks ran), the harness tasks, the settings, the versions and the date."""
    doc: dict[str, Any] = (
        result.to_dict() if result is not None
        else {"model": model, "data": data, "num_examples": 0, "metrics": {}, "samples": [],
              "details": {}}
    )
    if tasks is not None:
        doc["tasks"] = tasks
    doc["settings"] = settings
    doc["versions"] = versions()
    doc["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return doc


def check_output_path(path: Path) -> None:
    """An output file must be a file name, not an existing directory."""
    if path.is_dir():
        raise LargeForgeError(f"--output {path} is a directory; give a file name (results.json)")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise LargeForgeError(f"--output {path}: {parent} is a file, not a directory")
            break


def write_results(path: Path, document: dict[str, Any]) -> None:
    """Write `document` as JSON, atomically (the old file or the new one, never half)."""
    from largeforge.atomic_files import write_atomic_text

    check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_text(path, json.dumps(document, indent=2, ensure_ascii=False) + "\n")


# --- the whole `largeforge eval` as one call -----------------------------------------------------


@dataclass
class Evaluation:
    """What `evaluate` measured: metrics on a data file and/or lm-eval harness task results,
    with the settings they were measured with (what `largeforge eval --output` writes)."""

    model: str
    data: str | None
    result: EvalResult | None  # None when only harness tasks ran
    tasks: dict[str, dict[str, float]] | None  # task -> metric -> value; None without tasks
    settings: dict[str, Any]
    seconds: float = 0.0  # time spent evaluating on the data (harness tasks not counted)

    @property
    def metrics(self) -> dict[str, float]:
        """The data metrics (perplexity, loss, rouge1, ...); empty when only tasks ran."""
        return self.result.metrics if self.result is not None else {}

    @property
    def num_examples(self) -> int | None:
        """Examples evaluated on the data; None when only tasks ran."""
        return self.result.num_examples if self.result is not None else None

    def notes(self) -> list[str]:
        """What was cut or left out of the data metrics, in words."""
        return notes(self.result) if self.result is not None else []

    def to_dict(self) -> dict[str, Any]:
        """The results document: result, tasks, settings, versions and date."""
        return results_document(self.result, model=self.model, data=self.data,
                                settings=self.settings, tasks=self.tasks)

    def write(self, path: str | Path) -> Path:
        """Write `to_dict()` as JSON to `path`, atomically; returns the path."""
        target = Path(path)
        write_results(target, self.to_dict())
        return target


def _split_list(value: str | Sequence[str] | None) -> list[str]:
    """Names from a comma-separated string or a sequence of them."""
    items = [value] if isinstance(value, str) else list(value or [])
    return [part.strip() for item in items for part in item.split(",") if part.strip()]


def evaluate(
    model: str | Path,
    data: str | Path | None = None,
    metrics: str | Sequence[str] = "perplexity",
    *,
    tasks: str | Sequence[str] | None = None,
    include_path: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    max_examples: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    temperature: float = 0.0,
    seed: int = 0,
    chat_template: str | None = None,
    device: str = "auto",
    output: str | Path | None = None,
    on_status: Callable[[str], None] | None = None,
) -> Evaluation:
    """Evaluate `model` as `largeforge eval` does: metrics on `data` and/or lm-eval harness
    `tasks` (comma-separated or a list; `include_path`, `limit` and `num_fewshot` go with them).

    Every argument, the model reference and the data are checked before anything is loaded.
    `output` (a .json file) receives the results document once everything has run.
    `on_status(message)` hears what starts and what finished ("running harness tasks ...").
    """
    task_list = _split_list(tasks)
    if data is None and not task_list:
        raise LargeForgeError("give --data FILE, --tasks a,b, or both")
    metric_list = parse_metrics(metrics) if data is not None else []
    out_path = Path(output) if output is not None else None
    if out_path is not None:
        check_output_path(out_path)
    include = Path(include_path) if include_path is not None else None
    if include is not None and not include.is_dir():
        raise LargeForgeError(f"--include-path {include} is not a directory")
    if (include or limit is not None or num_fewshot is not None) and not task_list:
        raise LargeForgeError("--include-path, --limit and --num-fewshot go with --tasks")
    for name, value, least in (("--limit", limit, 1), ("--num-fewshot", num_fewshot, 0),
                               ("--batch-size", batch_size, 1),
                               ("--max-new-tokens", max_new_tokens, 1)):
        if value is not None and value < least:
            raise LargeForgeError(f"{name} must be >= {least}, got {value}")
    if not temperature >= 0:
        raise LargeForgeError(f"--temperature must be >= 0 (0 is greedy), got {temperature}")
    from largeforge.runs import resolve_model_dir

    resolve_model_dir(str(model))  # a missing model fails before anything is read or loaded
    if data is not None:  # the data is read and checked before any long work starts
        check_eval_inputs(data, metric_list, max_examples=max_examples, batch_size=batch_size,
                          device=device, chat_template=chat_template)

    say = on_status or (lambda message: None)
    task_results = None
    if task_list:
        from largeforge.evaluation.harness import run_harness

        say(f"running harness tasks {', '.join(task_list)} ...")
        task_results = run_harness(str(model), task_list, include_path=include, limit=limit,
                                   num_fewshot=num_fewshot, batch_size=batch_size,
                                   device=device)
    result = None
    seconds = 0.0
    if data is not None:
        start = time.perf_counter()
        result = evaluate_model(
            str(model), data, metric_list, max_examples=max_examples,
            max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature,
            device=device, seed=seed, chat_template=chat_template,
        )
        seconds = time.perf_counter() - start
        say(f"evaluated {model} on {data} in {seconds:.1f} s")
    settings: dict[str, Any] = {
        "metrics": metric_list, "max_examples": max_examples,
        "max_new_tokens": max_new_tokens, "batch_size": batch_size,
        "temperature": temperature, "seed": seed, "chat_template": chat_template,
        "device": device, "tasks": task_list, "include_path":
        str(include) if include else None, "limit": limit,
        "num_fewshot": num_fewshot,
    }
    evaluation = Evaluation(str(model), str(data) if data is not None else None, result,
                            task_results, settings, seconds)
    if out_path is not None:
        evaluation.write(out_path)
    return evaluation
