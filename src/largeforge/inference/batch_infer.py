"""Offline batch inference over a JSONL file of prompts, through the continuous-batching engine.

Input records are `{"id"?, "prompt"}` (continued as `generate()` continues text, or as one user
turn with `chat=True`) or `{"id"?, "messages": [...]}` (the model's chat template with the
generation prompt, as `ChatSession` does). A record without an id takes its line number.

Resumable: each finished record is one JSONL line, written whole, flushed and fsync'ed as soon
as it finishes (continuous batching finishes requests out of order); a re-run skips ids already
in the output and drops a last line cut short by a kill (as `largeforge data synth` does). When
all are done the file is rewritten (atomically) in input order. Sampling uses the same seed for
every record, so each output is what `generate()` gives for that prompt with that seed, and a
resumed run reproduces the records of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from largeforge.atomic_files import write_atomic_text
from largeforge.errors import LargeForgeError
from largeforge.inference.sampling import SamplingParams
from largeforge.text_files import json_lines, read_json_lines


@dataclass
class InferRecord:
    """One input record: where it came from, its id and what to continue."""

    line: int
    id: str | int
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None

    @property
    def key(self) -> str:
        return id_key(self.id)


@dataclass
class InferReport:
    records: int = 0
    done_before: int = 0  # already in the output when this run started
    written: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    finish_reasons: dict[str, int] = field(default_factory=dict)


def id_key(value: Any) -> str:
    """Ids compare as JSON, so 1 and "1" are different ids."""
    return json.dumps(value)


def read_infer_records(path: str | Path) -> list[InferRecord]:
    """The records of a JSONL prompts file; any bad line is an error that names it.

    Lines come from the shared JSONL reader (so a string holding U+2028 does not split a record,
    as `str.splitlines` would, and a line nested too deep or holding a lone surrogate is refused
    as every command refuses it); unlike `data validate`, the first bad line stops the read,
    since a prompt left out would leave a silent gap in the output."""
    records: list[InferRecord] = []
    first_line: dict[str, int] = {}
    for line in read_json_lines(path, "input file"):
        if line.error is not None:
            if not line.error.startswith("invalid JSON: "):
                raise LargeForgeError(f"{line.where}: {line.error}")
            detail = line.error.removeprefix("invalid JSON: ")
            raise LargeForgeError(f"{line.where} is not valid JSON ({detail})")
        record = _record(line.value, line.number, line.where)
        if record.key in first_line:
            raise LargeForgeError(
                f"{line.where}: id {record.key} is used already on line {first_line[record.key]} "
                "(a record without an id takes its line number)"
            )
        first_line[record.key] = line.number
        records.append(record)
    if not records:
        raise LargeForgeError(f"{path} holds no records")
    return records


def _record(data: Any, number: int, where: str) -> InferRecord:
    if not isinstance(data, dict):
        raise LargeForgeError(f"{where}: expected a JSON object with \"prompt\" or \"messages\"")
    record_id = data.get("id", number)
    if isinstance(record_id, bool) or not isinstance(record_id, (str, int)):
        raise LargeForgeError(f"{where}: \"id\" must be a string or an integer")
    if "messages" in data:
        messages = data["messages"]
        if not (
            isinstance(messages, list) and messages
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages
            )
        ):
            raise LargeForgeError(
                f"{where}: \"messages\" must be a non-empty list of "
                "{\"role\": ..., \"content\": ...} objects with string values"
            )
        return InferRecord(number, record_id, messages=messages)
    prompt = data.get("prompt")
    if not isinstance(prompt, str):
        raise LargeForgeError(
            f"{where}: no \"prompt\" (a string) or \"messages\" (a list) in this record"
        )
    return InferRecord(number, record_id, prompt=prompt)


def check_output_path(output: str | Path, input_path: str | Path | None = None) -> Path:
    out = Path(output)
    if out.is_dir():
        raise LargeForgeError(f"--output {out} is a directory; give a .jsonl file path")
    if input_path is not None and out.exists() and out.resolve() == Path(input_path).resolve():
        raise LargeForgeError(f"--output {out} is the input file; choose another output")
    return out


def read_finished(output: Path) -> tuple[list[str], set[str], int]:
    """(complete lines, their id keys, bytes of the complete lines) of an earlier run's output.

    A last line without its newline (cut short by a kill) is left out; nothing is changed on
    disk here. A line this command did not write is an error.
    """
    if not output.is_file():
        return [], set(), 0
    data = output.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    text = complete.decode("utf-8", errors="replace")
    raw_lines = text.split("\n")
    lines: list[str] = []
    keys: set[str] = set()
    for line in json_lines(text, output):
        value = line.value
        if line.error is not None or not (
            isinstance(value, dict) and "id" in value and "output" in value
        ):
            raise LargeForgeError(
                f"{line.where} is not a record `largeforge infer` wrote; choose another --output"
            )
        keys.add(id_key(value["id"]))
        lines.append(raw_lines[line.number - 1])
    return lines, keys, len(complete)


@dataclass
class _Prepared:
    record: InferRecord
    prompt_ids: list[int]
    params: SamplingParams
    eos: set[int] | None
    stops: list[str]


def _prepare(
    records: list[InferRecord], model: Any, tokenizer: Any, params: SamplingParams, chat: bool,
    source: str,
) -> list[_Prepared]:
    """Token ids and per-record settings; a prompt that does not fit the context is an error."""
    from dataclasses import replace

    from largeforge.inference.chat import ChatSession
    from largeforge.inference.generate import context_length, encode_prompt

    session = None
    if chat or any(r.messages is not None for r in records):
        try:
            session = ChatSession(model, tokenizer, params=params)
        except LargeForgeError:
            what = "--chat" if chat else "records with \"messages\""
            raise LargeForgeError(
                f"{what} need a model with a chat template, and this model has none; "
                "use records with \"prompt\" without --chat"
            ) from None
    limit = context_length(model)
    prepared = []
    for record in records:
        eos, stops = None, []
        if record.messages is not None or chat:
            assert session is not None
            messages = record.messages or [{"role": "user", "content": record.prompt or ""}]
            ids = session.prompt_ids(messages)[0].tolist()
            eos, stops = set(session.eos_ids), list(session.stop_strings)
        else:
            ids = encode_prompt(tokenizer, record.prompt or "")[0].tolist()
        budget = params.max_new_tokens
        if limit is not None:
            if len(ids) > limit or (eos is not None and len(ids) >= limit):
                raise LargeForgeError(
                    f"{source}:{record.line}: the prompt is {len(ids)} tokens and does not fit "
                    f"the model's context of {limit} tokens; shorten it"
                )
            budget = min(budget, limit - len(ids))
        prepared.append(
            _Prepared(record, ids, replace(params, max_new_tokens=budget), eos, stops)
        )
    return prepared


def run_infer(
    model: Any,
    tokenizer: Any,
    records: list[InferRecord],
    output: str | Path,
    params: SamplingParams,
    *,
    batch_size: int = 8,
    chat: bool = False,
    source: str = "input",
    on_record: Callable[[InferReport], None] | None = None,
) -> InferReport:
    """Generate an output for every record not yet in `output`, `batch_size` at once."""
    from largeforge.inference.engine import ContinuousBatchingEngine
    from largeforge.inference.requests import GenerationRequest

    if batch_size < 1:
        raise LargeForgeError(f"--batch-size must be at least 1, got {batch_size}")
    out = check_output_path(output)
    _, done, complete_bytes = read_finished(out)
    pending = [r for r in records if r.key not in done]
    report = InferReport(records=len(records), done_before=len(records) - len(pending))
    prepared = _prepare(pending, model, tokenizer, params, chat, source)

    # Everything is checked: now the output may change (a torn last line goes first).
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file() and out.stat().st_size != complete_bytes:
        with out.open("r+b") as f:
            f.truncate(complete_bytes)
    start = time.perf_counter()
    finished: queue.Queue[Any] = queue.Queue()
    in_flight = 2 * batch_size  # enough waiting to refill every slot that frees up
    engine = ContinuousBatchingEngine(
        model, tokenizer, max_batch_size=batch_size, max_queue=in_flight
    )
    records_of: dict[str, InferRecord] = {}
    engine.start()
    try:
        with out.open("a", encoding="utf-8") as sink:
            next_up = 0
            while report.written < len(prepared):
                while next_up < len(prepared) and next_up - report.written < in_flight:
                    item = prepared[next_up]
                    handle = engine.submit(
                        GenerationRequest(
                            item.prompt_ids, item.params, stop=item.stops,
                            eos_token_ids=item.eos,
                        )
                    )
                    records_of[handle.request_id] = item.record
                    handle.add_done_callback(finished.put)
                    next_up += 1
                handle = finished.get()
                result = handle.result()
                record = records_of.pop(handle.request_id)
                sink.write(json.dumps(_output_record(record, result), ensure_ascii=False) + "\n")
                sink.flush()
                os.fsync(sink.fileno())
                report.written += 1
                report.completion_tokens += result.completion_tokens
                reason = result.finish_reason
                report.finish_reasons[reason] = report.finish_reasons.get(reason, 0) + 1
                if on_record is not None:
                    on_record(report)
    finally:
        engine.shutdown()
    report.seconds = time.perf_counter() - start
    _sort_output(out, records)
    return report


def _output_record(record: InferRecord, result: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"id": record.id}
    if record.messages is not None:
        data["messages"] = record.messages
    else:
        data["prompt"] = record.prompt
    data.update(
        output=result.text, finish_reason=result.finish_reason,
        prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
    )
    return data


def _sort_output(out: Path, records: list[InferRecord]) -> None:
    """Rewrite `out` in input order when it is not (records finish out of order); lines with
    ids that are not in the input keep their order after the others."""
    if not out.is_file():
        return
    lines, _, _ = read_finished(out)
    order = {r.key: i for i, r in enumerate(records)}
    positions = [order.get(id_key(json.loads(line)["id"]), len(order)) for line in lines]
    if positions == sorted(positions):
        return
    ranked = sorted(range(len(lines)), key=lambda i: positions[i])  # stable: extras keep order
    write_atomic_text(out, "".join(lines[i] + "\n" for i in ranked))
