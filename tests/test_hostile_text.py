"""Text the encoders refuse, and the byte-order mark (issue 18, class 3 and the BOM of class 7).

A string holding a lone surrogate (the JSON escape "\\ud800", which UTF-8 and so every tokenizer
refuses) and JSON nested 100,000 levels deep are refused by one set of checks
(`text_files.loads`), shared by every reader: `data validate` lists them with file:line,
`train` (and its --verify-only), `train sft`, `infer`, `data prepare` and `tokenizer train`
refuse them with one `error:` line naming file:line, and the servers answer 400 (the inference
server's cases are in test_serve_errors.py). A UTF-8 BOM is accepted by every reader of every
command. Readers are tested in-process on real files; the commands once each where the command
adds something (its exit code, its order of checks, nothing written).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cli_contract import refused, snapshot, succeeds
from conftest import run_cli
from largeforge.errors import LargeForgeError
from largeforge.text_files import MAX_JSON_DEPTH, UnusableJson, loads

BOM = "\ufeff"
LONE = '"fox \\ud800 den"'  # a JSON string holding a lone surrogate, as a file holds it
DEEP = "[" * 100_000  # as the issue sends it: deeper than any recursion limit
TEXT = "Once upon a time there was a little fox who lived in the forest.\n" * 60
CHAT = [{"messages": [{"role": "user", "content": f"Say {word}."},
                      {"role": "assistant", "content": f"{word.title()}!"}]}
        for word in ("hello", "goodbye", "yes", "no", "maybe", "thanks")]


def jsonl(path: Path, records: list[Any], *, bad: str | None = None, at: int = 2,
          bom: bool = False) -> Path:
    """Write `records` one a line, the raw line `bad` at line `at` (1-based)."""
    lines = [json.dumps(r) for r in records]
    if bad is not None:
        lines.insert(at - 1, bad)
    path.write_text((BOM if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def texts(n: int = 6) -> list[dict[str, str]]:
    return [{"text": f"{TEXT[:64]} number {i}"} for i in range(n)]


# --- the shared checks ----------------------------------------------------------------------


@pytest.mark.parametrize(("text", "column", "words"), [
    ('{"a": "x\\ud800"}', 9, "lone surrogate \\ud800 at column 9 (in the string at a)"),
    ('{"m": [{"c": "ok"}, {"c": "\\uDFFF"}]}', 28, "(in the string at m[1].c)"),
    ('["\\ud83d\\u0041"]', 3, "lone surrogate \\ud83d"),  # a high half, then no low half
    ('{"k\\udc00": 1}', 4, "in the key 'k\\udc00' of the record"),
    (DEEP, MAX_JSON_DEPTH + 1, f"nested more than {MAX_JSON_DEPTH} levels deep"),
    ("{" * 40 + '"a": ' + "[" * 70, 106, "nested more than"),
])
def test_loads_refuses_what_no_command_can_use(text: str, column: int, words: str) -> None:
    with pytest.raises(UnusableJson) as info:
        loads(text)
    assert info.value.colno == column and words in info.value.msg
    assert info.value.msg.encode("ascii")  # printable anywhere: the escape, never the raw half


@pytest.mark.parametrize("text", [
    '"\\ud83d\\ude00 a pair is one character"', '"\\\\ud800 is an escaped backslash"',
    '"[[[[ brackets in a string do not nest"', "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH,
])
def test_loads_takes_what_is_fine(text: str) -> None:
    assert loads(text) == json.loads(text)


# --- every reader, in-process -----------------------------------------------------------------


def _validate(path: Path) -> list[str]:
    from largeforge.data.validate import validate_records

    return [str(p) for p in validate_records(path).problems]


def _documents(path: Path) -> list[str]:
    from largeforge.data.sources import iter_documents, resolve_sources

    return list(iter_documents(resolve_sources([path])))


def _load(path: Path) -> list[Any]:
    from largeforge.data.formats import load_records

    return list(load_records(path).dataset)


def _infer(path: Path) -> list[Any]:
    from largeforge.inference.batch_infer import read_infer_records

    return [r.prompt for r in read_infer_records(path)]


def _labelled(path: Path) -> list[Any]:
    from largeforge.serving.routing import read_labeled_prompts

    return read_labeled_prompts(path)


REFUSING: dict[str, Callable[[Path], Any]] = {
    "pretraining and tokenizer text": _documents, "records (train sft, data prepare/stats)": _load,
    "infer prompts": _infer, "router train prompts": _labelled,
}


@pytest.mark.parametrize("reader", REFUSING, ids=["documents", "records", "infer", "router"])
@pytest.mark.parametrize(("bad", "words"), [
    ('{"text": ' + LONE + ', "prompt": ' + LONE + ', "label": "a"}', "lone surrogate \\ud800"),
    (DEEP, "nested more than"),
], ids=["surrogate", "deep"])
def test_a_reader_that_stops_names_file_and_line(tmp_path: Path, reader: str, bad: str,
                                                 words: str) -> None:
    records = [{"text": f"t{i}", "prompt": f"p{i}", "label": "ab"[i % 2]} for i in range(4)]
    path = jsonl(tmp_path / "data.jsonl", records, bad=bad, at=3)
    with pytest.raises(LargeForgeError) as info:
        REFUSING[reader](path)
    assert f"{path}:3: " in str(info.value) and words in str(info.value)


def test_validation_lists_each_one_with_file_and_line(tmp_path: Path) -> None:
    from largeforge.data.validate import DatasetValidator

    lines = jsonl(tmp_path / "a.jsonl", texts(), bad='{"text": ' + LONE + "}", at=3)
    with open(lines, "a", encoding="utf-8") as f:
        f.write(DEEP + "\n")
    assert [p.split(": ")[:2] for p in _validate(lines)] == [
        [f"{lines}:3", "bad_json"], [f"{lines}:8", "bad_json"]]
    array = tmp_path / "b.json"
    array.write_text('[\n{"text": "one"},\n{"text": ' + LONE + '},\n{"text": "three"}\n]')
    assert _validate(array) == [f"{array}:3: bad_json: lone surrogate \\ud800 (in the string "
                                "at text): not Unicode text, which no tokenizer can encode; "
                                "remove it, or write the whole character (a surrogate pair)"]
    table = tmp_path / "c.csv"
    table.write_text('messages\n"[{""role"": ""user"", ""content"": ""\\ud800""}]"\n'
                     '"[{""role"": ""user"", ""content"": ""hi""}, '
                     '{""role"": ""assistant"", ""content"": ""yo""}]"\n')
    assert _validate(table)[0].startswith(f"{table}:2: bad_json: column 'messages': lone")
    memory = DatasetValidator().validate([{"text": "fine"}, {"text": "bad \ud800"}])
    assert [str(p).split(": ")[:2] for p in memory.problems] == [["<records>:2", "bad_json"]]
    array.write_text(DEEP)
    with pytest.raises(LargeForgeError, match=rf"{array}:1: JSON nested more than"):
        _validate(array)


def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path: Path) -> None:
    for name, reader in (("a.jsonl", _validate), ("b.txt", _documents), ("c.jsonl", _documents),
                         ("d.jsonl", _infer)):
        path = tmp_path / name
        # a UTF-8-encoded surrogate too: valid-looking bytes that UTF-8 forbids
        path.write_bytes(b'{"text": "ok", "prompt": "ok"}\n' * 2 + b'{"text": "\xed\xa0\x80"}\n')
        with pytest.raises(LargeForgeError, match=rf"{path}:3: not valid UTF-8"):
            reader(path)


def _bom_cases(root: Path) -> list[tuple[str, Callable[[Path], Any]]]:
    from largeforge.data.readers import read_records
    from largeforge.text_files import read_yaml_mapping

    def records(path: Path) -> Any:
        return [(r.source, r.data) for f in read_records(path) for r in f.records]

    rows = texts(3)
    (root / "a.txt").write_text(TEXT)
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "a.json").write_text(json.dumps(rows, indent=1))
    (root / "a.csv").write_text("text\n" + "".join(f"{r['text']}\n" for r in rows))
    (root / "p.jsonl").write_text('{"prompt": "Once"}\n{"prompt": "upon"}\n')
    (root / "l.jsonl").write_text('{"text": "x", "label": "a"}\n{"text": "y", "label": "b"}\n')
    (root / "r.yaml").write_text("train:\n  lr: 0.1\n")
    return [("a.txt", records), ("a.jsonl", records), ("a.json", records), ("a.csv", records),
            ("a.txt", _documents), ("a.jsonl", _documents), ("a.json", _documents),
            ("a.jsonl", _load), ("p.jsonl", _infer), ("l.jsonl", _labelled),
            ("r.yaml", lambda p: read_yaml_mapping(p, "recipe file"))]


def test_a_bom_is_read_as_nothing_by_every_reader(tmp_path: Path) -> None:
    plain, marked = tmp_path / "plain", tmp_path / "marked"
    plain.mkdir()
    marked.mkdir()
    for name, reader in _bom_cases(plain):
        text = (plain / name).read_text(encoding="utf-8")
        (marked / name).write_text(BOM + text, encoding="utf-8")
        expected = json.dumps(reader(plain / name), default=str).replace(str(plain), "X")
        assert json.dumps(reader(marked / name), default=str).replace(str(marked), "X") \
            == expected, (name, reader)


def test_both_servers_parse_bodies_through_the_shared_checks(tmp_path: Path) -> None:
    """The router (in-process here; `serve inference` in test_serve_errors.py) answers 400 with
    an OpenAI error body naming the field, before routing anything anywhere."""
    import yaml
    from fastapi.testclient import TestClient

    from largeforge.serving.router_app import create_router_app
    from largeforge.serving.router_config import load_router_config
    from largeforge.serving.router_replicas import free_port

    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump({"experts": [{
        "name": "x", "urls": [f"http://127.0.0.1:{free_port()}"], "keywords": "x"}],
        "health": {"interval": 60}}))
    bodies = [
        (b'{"model": "x", "messages": [{"role": "user", "content": ' + LONE.encode() + b"}]}",
         "messages.0.content", "lone surrogate \\ud800"),
        (b'{"model": "x", "prompt": ' + DEEP.encode() + b"}", None, "nested more than"),
        (b'{"model": "x", "prompt": "\xed\xa0\x80"}', None, "could not parse"),
    ]
    with TestClient(create_router_app(load_router_config(config))) as client:
        for body, param, words in bodies:
            reply = client.post("/v1/chat/completions", content=body)
            assert reply.status_code == 400, reply.text
            error = reply.json()["error"]
            assert (error["code"], error["param"]) == ("invalid_json", param)
            assert words in error["message"]


# --- the commands ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import tiny_models

    root = tmp_path_factory.mktemp("hostile-model")
    tokenizer = tiny_models.make_tokenizer([TEXT, *(json.dumps(r) for r in CHAT)])
    tiny_models.make_family_model("llama", tokenizer).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


TINY = ["--preset", "tiny", "--max-steps", "2", "--set", "tokenizer.vocab_size=300",
        "--set", "data.seq_len=16", "--set", "model.dim=32", "--set", "model.n_layers=1",
        "--set", "model.n_heads=2", "--set", "model.n_kv_heads=1", "--set", "train.batch_size=2",
        "--output-dir", "runs", "--name", "run"]


def test_train_verify_only_catches_what_training_would_crash_on(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text(TEXT, encoding="utf-8")
    train = ["train", "--data", "corpus.jsonl", "--data", "notes.txt", *TINY]
    jsonl(tmp_path / "corpus.jsonl", texts(), bad='{"text": ' + LONE + "}", at=3)
    line = refused(tmp_path, *train, "--verify-only")
    assert "corpus.jsonl:3: lone surrogate \\ud800" in line and "remove it" in line
    # The run itself refuses too (the same check, while it trains its tokenizer).
    jsonl(tmp_path / "corpus.jsonl", texts(), bad=DEEP, at=2)
    line = refused(tmp_path, *train)
    assert "corpus.jsonl:2: JSON nested more than 100 levels deep" in line
    # Corrected, and both files with a BOM: the same command trains, without --overwrite.
    jsonl(tmp_path / "corpus.jsonl", texts(), bom=True)
    (tmp_path / "notes.txt").write_text(BOM + TEXT, encoding="utf-8")
    succeeds(tmp_path, *train)
    assert (tmp_path / "runs" / "run" / "final").is_dir()


def test_train_sft(tmp_path: Path, model_dir: Path) -> None:
    """--verify-only reads the data as the run does (`load_records`, in the trainer's check);
    the run itself is left out here for time."""
    sft = ["train", "sft", "--model", str(model_dir), "--dataset", "chat.jsonl",
           "--chat-template", "chatml", "--seq-len", "64", "--output", "out", "--verify-only"]
    bad = json.dumps(CHAT[0]).replace("Say hello.", "Say \\ud800.")
    jsonl(tmp_path / "chat.jsonl", CHAT, bad=bad, at=4)
    line = refused(tmp_path, *sft)
    assert "chat.jsonl:4: lone surrogate \\ud800" in line
    assert "messages[0].content" in line and "data validate" in line
    jsonl(tmp_path / "chat.jsonl", CHAT, bom=True)
    assert "6 messages conversations" in succeeds(tmp_path, *sft)


def test_infer(tmp_path: Path, model_dir: Path) -> None:
    infer = ["infer", "--model", str(model_dir), "--input", "prompts.jsonl", "--output",
             "out.jsonl", "--max-new-tokens", "2"]
    prompts = [{"prompt": "Once upon"}, {"prompt": "a time"}]
    jsonl(tmp_path / "prompts.jsonl", prompts, bad='{"prompt": ' + LONE + "}", at=2)
    assert "prompts.jsonl:2: lone surrogate \\ud800" in refused(tmp_path, *infer)
    jsonl(tmp_path / "prompts.jsonl", prompts, bom=True)
    succeeds(tmp_path, *infer)
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2


def test_tokenizer_train(tmp_path: Path) -> None:
    command = ["tokenizer", "train", "--data", "corpus.json", "--data", "notes.txt",
               "--vocab-size", "300", "--output", "tok"]
    (tmp_path / "notes.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "corpus.json").write_text('[\n{"text": "a"},\n' + DEEP)
    assert "corpus.json:3: JSON nested more than 100" in refused(tmp_path, *command)
    (tmp_path / "corpus.json").write_text(BOM + json.dumps(texts()), encoding="utf-8")
    (tmp_path / "notes.txt").write_text(BOM + TEXT, encoding="utf-8")
    succeeds(tmp_path, *command)
    assert (tmp_path / "tok" / "tokenizer.json").is_file()


def test_data_validate_and_prepare(tmp_path: Path, model_dir: Path) -> None:
    jsonl(tmp_path / "data.jsonl", texts(), bad='{"text": ' + LONE + "}", at=5)
    before = snapshot(tmp_path)
    proc = run_cli("data", "validate", "data.jsonl", "--tokenizer", str(model_dir),
                   "--max-length", "64", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "data.jsonl:5: bad_json: lone surrogate \\ud800" in proc.stdout
    assert "6 valid, 1 invalid" in proc.stdout and snapshot(tmp_path) == before
    prepare = ["data", "prepare", "data.jsonl", "--output", "prepared"]
    jsonl(tmp_path / "data.jsonl", texts(), bad=DEEP, at=2)
    assert "data.jsonl:2: JSON nested more than" in refused(tmp_path, *prepare)
    jsonl(tmp_path / "data.jsonl", texts(), bom=True)
    assert "6 valid, 0 invalid" in succeeds(tmp_path, "data", "validate", "data.jsonl")
    succeeds(tmp_path, *prepare)
    assert (tmp_path / "prepared" / "train.jsonl").is_file()
