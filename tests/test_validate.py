"""`largeforge data validate`: every problem with file:line, counts, exit codes, --output."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from largeforge.cli.data_cmd import register
from largeforge.data.validate import validate_records
from largeforge.errors import LargeForgeError


def turn(speaker, value):
    return {"from": speaker, "value": value}


GOOD = {"conversations": [turn("human", "Hi"), turn("gpt", "Hello")]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def invoke(*args):
    """Run `data ...` in-process as `largeforge` would: LargeForgeError -> exit code 2."""
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["data", *args])
    if isinstance(result.exception, LargeForgeError):
        return 2, result.output, str(result.exception)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output, ""


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from largeforge.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tok"
    texts = ["Hello there, how are you today? I am fine, thank you."] * 50
    train_tokenizer(texts, 300, path)
    return path


@pytest.mark.parametrize("name, code", [
    ("alpaca_sample.json", 0), ("chat_sample.jsonl", 0), ("hh_rlhf_sample.jsonl", 1),
])
def test_shared_samples(shared_data, name, code):
    path = shared_data / name
    before = path.read_bytes()
    status, output, _ = invoke("validate", str(path))
    assert status == code
    assert path.read_bytes() == before
    if code == 1:  # hh-rlhf holds a few empty answers and back-to-back assistant turns
        assert f"{path}:87: empty_assistant: chosen" in output
        assert "role_order" in output and "invalid" in output
    else:
        assert " 0 invalid" in output


def test_every_problem_with_file_and_line(tmp_path):
    records = [
        GOOD,                                                              # 1 fine
        {"conversations": [turn("human", "Hi"), turn("gpt", "  ")]},       # 2 empty answer
        {"conversations": [turn("human", "Hi"), turn("gpt", "Yo"), turn("human", "Bye")]},  # 3
        {"conversations": [turn("gpt", "Hi"), turn("human", "Hello")]},    # 4 wrong order
        {"conversations": [turn("human", "Hi"), turn("human", "Again"), turn("gpt", "Yes")]},
        {"conversations": [turn("human", "Hi"), turn("gpt", "Hello")]},    # 6 duplicate of 1
        {"conversations": [turn("human", " Hi "), turn("gpt", "Hello\n")]},  # 7 same after spaces
        {"id": 3},                                                         # 8 missing field
        {"conversations": [turn("robot", "Hi")]},                          # 9 unknown role
        {"conversations": []},                                             # 10 empty
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    lines = path.read_text().splitlines()
    lines.insert(4, lines[4][:30])  # line 5: a truncated JSON line in the middle
    path.write_text("\n".join(lines) + "\n")
    before = path.read_bytes()
    status, output, _ = invoke("validate", str(path))
    assert status == 1
    expected = [
        ":2: empty_assistant: message 2 (assistant) is empty",
        ":3: ends_on_user: conversation ends on a user turn",
        ":4: role_order: conversation opens with the assistant",
        ":5: bad_json: invalid JSON",
        ":6: role_order: messages 1 and 2 are both user",
        f":7: duplicate: same as {path}:1",
        f":8: duplicate: same as {path}:1",
        ":9: missing_field: missing field 'conversations'",
        ":10: unknown_role: conversations[0] is from 'robot'",
        ":11: empty_field: conversation has no messages",
    ]
    for text in expected:
        assert f"{path}{text}" in output
    assert path.read_bytes() == before

    report = validate_records(path)
    assert report.format == "sharegpt" and report.total == 11 and len(report.valid) == 1
    assert report.counts() == {"bad_json": 1, "missing_field": 1, "unknown_role": 1,
                               "empty_field": 1, "empty_assistant": 1, "role_order": 2,
                               "ends_on_user": 2, "duplicate": 2}  # line 4 ends on user too


def test_output_writes_only_valid_records(tmp_path, shared_data):
    source = tmp_path / "alpaca.jsonl"
    good = [{"instruction": f"Say {n}", "input": "", "output": str(n)} for n in range(4)]
    bad = [{"instruction": "Say x", "input": "", "output": ""},         # empty answer
           {"instruction": "", "input": "", "output": "x"},              # empty instruction
           dict(good[0])]                                                # duplicate
    write_jsonl(source, good + bad)
    clean = tmp_path / "out" / "clean.jsonl"
    status, output, _ = invoke("validate", str(source), "--output", str(clean))
    assert status == 1
    assert [json.loads(line) for line in clean.read_text().splitlines()] == good
    assert "wrote 4 valid records" in output and "dropped 3" in output
    assert "1 empty_assistant" in output and "1 empty_field" in output
    assert "1 duplicate" in output
    status, _, _ = invoke("validate", str(clean))  # the clean file is clean
    assert status == 0

    hh_clean = tmp_path / "hh.jsonl"
    status, output, _ = invoke("validate", str(shared_data / "hh_rlhf_sample.jsonl"),
                               "-o", str(hh_clean))
    assert status == 1 and "wrote 995 valid records" in output
    first = json.loads(hh_clean.read_text().splitlines()[0])
    assert set(first) == {"chosen", "rejected"}  # the input's own format
    assert invoke("validate", str(hh_clean))[0] == 0


def test_output_may_not_be_the_input(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    before = path.read_bytes()
    status, _, error = invoke("validate", str(path), "--output", str(path))
    assert status == 2 and "the input is never modified" in error
    assert path.read_bytes() == before


def test_too_long_with_a_tokenizer(tmp_path, tokenizer_dir):
    short = {"instruction": "Hi", "output": "Hello"}
    long = {"instruction": "Tell me a story.", "output": "Once upon a time " * 40}
    path = write_jsonl(tmp_path / "d.jsonl", [short, long])
    status, output, _ = invoke("validate", str(path), "--tokenizer", str(tokenizer_dir),
                               "--max-length", "64")
    assert status == 1
    assert f"{path}:2: too_long:" in output and "more than --max-length 64" in output
    assert f"{path}:1:" not in output
    assert invoke("validate", str(path), "--tokenizer", str(tokenizer_dir),
                  "--max-length", "4096")[0] == 0
    status, _, error = invoke("validate", str(path), "--max-length", "64")
    assert status == 2 and "--tokenizer and --max-length go together" in error


@pytest.mark.parametrize("setup, message", [
    ("mixed", "mixed formats"),
    ("binary", "binary file"),
    ("csv", "CSV header"),
    ("missing", "data file not found"),
    ("format", "unknown format"),
])
def test_unreadable_input_exits_2(tmp_path, setup, message):
    path = tmp_path / "data.jsonl"
    args: list[str] = []
    if setup == "mixed":
        write_jsonl(path, [GOOD, {"instruction": "Hi", "output": "Hello"}])
    elif setup == "binary":
        path.write_bytes(b"\x00\x01\x02\xff" * 100)
    elif setup == "csv":
        path = tmp_path / "data.csv"
        path.write_text("question,answer\nWhy?,Because.\n")
    elif setup == "format":
        write_jsonl(path, [GOOD])
        args = ["--format", "chatml"]
    before = path.read_bytes() if path.exists() else None
    status, _, error = invoke("validate", str(path), *args)
    assert status == 2 and message in error
    if before is not None:
        assert path.read_bytes() == before


def test_explicit_format_reports_records_that_do_not_fit(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"instruction": "Hi", "output": "Hello"}])
    report = validate_records(path, "sharegpt")
    assert [(p.source, p.kind) for p in report.problems] == [(f"{path}:2", "missing_field")]


def test_messages_and_preference_checks(tmp_path):
    messages = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "S"},
                      {"role": "assistant", "content": "Hello"}]},
        {"prompt": "x"},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", messages[:1])
    report = validate_records(path)
    assert [p.kind for p in report.problems] == ["role_order"]
    assert "message 2 is a system message" in report.problems[0].message

    pairs = [
        {"prompt": "Q", "chosen": "A", "rejected": "A"},
        {"prompt": "Q", "chosen": "", "rejected": "B"},
        {"prompt": "", "chosen": "A", "rejected": "B"},
        {"prompt": "Q", "chosen": "A", "rejected": "B"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", pairs)
    report = validate_records(path)
    assert [(p.source.rsplit(":", 1)[1], p.kind) for p in report.problems] == [
        ("1", "identical_pair"), ("2", "empty_assistant"), ("3", "empty_field")]
    assert len(report.valid) == 1


def test_text_and_csv_validation(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\nhello world,1\n,2\nhello   world,3\n")
    report = validate_records(path)
    assert report.format == "text"
    assert [(p.source, p.kind) for p in report.problems] == [
        (f"{path}:3", "empty_field"), (f"{path}:4", "duplicate")]


def test_a_file_without_records_exits_2(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("instruction,input,output\n")
    status, _, error = invoke("validate", str(path))
    assert status == 2 and "no records in" in error
