"""Synthetic SFT data from a teacher: an OpenAI-compatible endpoint (through the official `openai`
client) or a local model, one prompt at a time, a bounded number at once. `SyntheticDataGenerator`
is the whole of `largeforge data synth` for Python callers; `synthesize` the loop under it.

Resumable: each finished record is one JSONL line, written whole, flushed and fsync'ed, and names
the prompt it answers by a hash; a re-run skips finished prompts, and a line cut short by a kill
is dropped before appending. Retries with exponential backoff are the `openai` client's own
(`max_retries`: connection errors, 408, 409, 429 and 5xx). Every record says which teacher and
settings made it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from largeforge.errors import LargeForgeError
from largeforge.text_files import read_text

PROMPT_FIELDS = ("prompt", "instruction", "text", "question")


@dataclass
class SynthSettings:
    teacher: str
    model: str | None = None
    temperature: float = 0.7
    max_tokens: int = 256
    system: str | None = None
    seed: int | None = None


@dataclass
class SynthReport:
    prompts: int = 0
    skipped: int = 0  # finished in an earlier run
    written: int = 0
    failed: list[str] = field(default_factory=list)  # the errors, one per failed prompt


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .txt file (one a line) or JSON/JSONL records (`prompt`, `instruction`,
    `text` or `question`; alpaca's `input` is appended to its instruction)."""
    source = Path(path)
    text = read_text(source, "prompts file")  # the shared checks: a BOM, a byte not UTF-8
    if source.suffix.lower() == ".txt":
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        prompts = []
        from largeforge.data.readers import read_records

        for raw in read_records(source):
            for record in raw.records:
                if record.data is None:
                    raise LargeForgeError(f"{record.source}: {record.error}")
                prompts.append(_prompt_of(record.data, record.source))
    if not prompts:
        raise LargeForgeError(f"{source} holds no prompt")
    return list(dict.fromkeys(prompts))  # the same prompt twice is asked once


def _prompt_of(record: Any, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for name in PROMPT_FIELDS:
            value = record.get(name)
            if isinstance(value, str) and value.strip():
                extra = record.get("input") if name == "instruction" else None
                return f"{value}\n\n{extra}" if isinstance(extra, str) and extra else value
    raise LargeForgeError(f"{where}: no prompt field ({', '.join(PROMPT_FIELDS)})")


def finished_keys(output: Path) -> set[str]:
    """Keys of the prompts already answered in `output`; a last line cut short is removed."""
    if not output.is_file():
        return set()
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with output.open("r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    keys = set()
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            keys.add(json.loads(line)["synth"]["prompt_key"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LargeForgeError(
                f"{output}:{number} is not a record this command wrote; choose another --output"
            ) from None
    return keys


class OpenAITeacher:
    """Any OpenAI-compatible chat endpoint; base URL and key from the arguments or from the
    client's own environment variables (OPENAI_BASE_URL, OPENAI_API_KEY)."""

    def __init__(self, base_url: str | None, api_key: str | None, model: str | None,
                 max_retries: int = 3, timeout: float = 120.0) -> None:
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get(
            "OPENAI_API_KEY", "none"), max_retries=max_retries, timeout=timeout)
        self.model = model

    def resolve_model(self) -> str:
        if self.model:
            return self.model
        models = self.client.models.list().data
        if not models:
            raise LargeForgeError("the endpoint lists no model; pass --model")
        return models[0].id

    def __call__(self, messages: list[dict[str, str]], settings: SynthSettings) -> str:
        response = self.client.chat.completions.create(
            model=settings.model or self.resolve_model(), messages=messages,  # type: ignore[arg-type]
            temperature=settings.temperature, max_tokens=settings.max_tokens, seed=settings.seed,
        )
        return response.choices[0].message.content or ""


class LocalTeacher:
    """A local model (directory, run or cached hub id) answering through its chat template; one
    generation at a time (the model is shared)."""

    def __init__(self, ref: str) -> None:
        from largeforge.inference.generate import load_for_inference

        self.model, self.tokenizer = load_for_inference(ref)
        self.lock = threading.Lock()

    def __call__(self, messages: list[dict[str, str]], settings: SynthSettings) -> str:
        from largeforge.inference.chat import ChatSession
        from largeforge.inference.sampling import SamplingParams

        params = SamplingParams(temperature=settings.temperature,
                                max_new_tokens=settings.max_tokens, seed=settings.seed)
        with self.lock:
            session = ChatSession(self.model, self.tokenizer, params=params)
            session.messages = messages[:-1]
            return "".join(session.send(messages[-1]["content"]))


def make_teacher(teacher: str, *, api_key: str | None = None, model: str | None = None,
                 max_retries: int = 3) -> Callable[[list[dict[str, str]], SynthSettings], str]:
    if teacher.startswith(("http://", "https://")):
        return OpenAITeacher(teacher, api_key, model, max_retries=max_retries)
    return LocalTeacher(teacher)


def _record(prompt: str, reply: str, fmt: str, settings: SynthSettings) -> dict[str, Any]:
    meta = {**asdict(settings), "prompt_key": prompt_key(prompt),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if fmt == "alpaca":
        return {"instruction": prompt, "input": "", "output": reply, "synth": meta}
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    if settings.system:
        messages.insert(0, {"role": "system", "content": settings.system})
    return {"messages": messages, "synth": meta}


def synthesize(
    prompts: list[str],
    teacher: Callable[[list[dict[str, str]], SynthSettings], str],
    output: str | Path,
    *,
    fmt: str = "messages",
    settings: SynthSettings,
    concurrency: int = 4,
    on_record: Callable[[int, int], None] | None = None,
) -> SynthReport:
    """Answer every prompt not yet in `output`, `concurrency` at a time, appending records."""
    if fmt not in ("alpaca", "messages"):
        raise LargeForgeError(f"--format {fmt!r}: alpaca or messages")
    if concurrency < 1:
        raise LargeForgeError("--concurrency must be at least 1")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = finished_keys(out)
    pending = [p for p in prompts if prompt_key(p) not in done]
    report = SynthReport(prompts=len(prompts), skipped=len(prompts) - len(pending))
    lock = threading.Lock()

    def ask(prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        if settings.system:
            messages.insert(0, {"role": "system", "content": settings.system})
        return teacher(messages, settings)

    with out.open("a", encoding="utf-8") as sink, ThreadPoolExecutor(concurrency) as pool:
        futures = {pool.submit(ask, prompt): prompt for prompt in pending}
        for future in as_completed(futures):
            prompt = futures[future]
            try:
                reply = future.result()
            except Exception as exc:  # noqa: BLE001 - any teacher failure: report, go on
                report.failed.append(f"{prompt[:40]!r}: {type(exc).__name__}: {exc}")
                continue
            line = json.dumps(_record(prompt, reply, fmt, settings), ensure_ascii=False) + "\n"
            with lock:
                sink.write(line)
                sink.flush()
                os.fsync(sink.fileno())
                report.written += 1
            if on_record:
                on_record(report.skipped + report.written, report.prompts)
    return report


Teacher = Callable[[list[dict[str, str]], SynthSettings], str]


class SyntheticDataGenerator:
    """Synthetic SFT data from a teacher, as `largeforge data synth` makes it:

        gen = SyntheticDataGenerator("http://localhost:8000/v1", temperature=0.7)
        report = gen.generate("prompts.txt", "synth.jsonl")   # or a list of prompts

    - `teacher`: an OpenAI-compatible base URL (http://host:port/v1), a local model directory,
      run or hub id, or a callable `(messages, settings) -> answer`.
    - `format`: "messages" (default) or "alpaca" records.
    - `model` (the name at the endpoint; default: the first it lists), `api_key`, `retries`
      (per request, with backoff), `temperature`, `max_tokens`, `system` (a system prompt for
      every ask), `seed`, `concurrency` (requests in flight at once).

    Resumable: `generate` appends to its output and skips the prompts already answered there.
    """

    def __init__(
        self,
        teacher: str | Teacher,
        *,
        format: str = "messages",
        model: str | None = None,
        api_key: str | None = None,
        retries: int = 3,
        temperature: float = 0.7,
        max_tokens: int = 256,
        system: str | None = None,
        seed: int | None = None,
        concurrency: int = 4,
    ) -> None:
        self.teacher = teacher
        self.format = format
        self.api_key = api_key
        self.retries = retries
        self.concurrency = concurrency
        name = teacher if isinstance(teacher, str) else getattr(
            teacher, "__name__", type(teacher).__name__)
        self.settings = SynthSettings(teacher=name, model=model, temperature=temperature,
                                      max_tokens=max_tokens, system=system, seed=seed)

    def generate(
        self,
        prompts: str | Path | list[str],
        output: str | Path,
        *,
        on_record: Callable[[int, int], None] | None = None,
    ) -> SynthReport:
        """Answer every prompt (a list, or a .txt/JSON/JSONL file as `read_prompts` reads it) not
        yet in `output`, appending one record a line. `on_record(done, total)` follows progress.
        The prompts are read before the teacher is made (a local model is loaded)."""
        asked = read_prompts(prompts) if isinstance(prompts, (str, Path)) else list(
            dict.fromkeys(prompts))
        if not asked:
            raise LargeForgeError("no prompt given")
        teacher = self.teacher
        if isinstance(teacher, str):
            teacher = make_teacher(teacher, api_key=self.api_key, model=self.settings.model,
                                   max_retries=self.retries)
        return synthesize(asked, teacher, output, fmt=self.format, settings=self.settings,
                          concurrency=self.concurrency, on_record=on_record)
