"""Data sources: resolving paths into sources, streaming documents, and content fingerprints."""

from __future__ import annotations

import json
import shutil

import pytest

import largeforge.data.sources as sources_module
from largeforge.data.sources import Source, fingerprint, iter_documents, resolve_sources
from largeforge.errors import LargeForgeError


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def docs(paths, **kwargs):
    return list(iter_documents(resolve_sources(paths), **kwargs))


# --- resolve_sources ---------------------------------------------------------------------------


def test_resolve_single_file_and_kinds(tmp_path):
    text = write(tmp_path / "a.txt", "hello")
    jsonl = write(tmp_path / "b.jsonl", '{"text": "x"}\n')
    js = write(tmp_path / "c.JSON", '[{"text": "x"}]')
    md = write(tmp_path / "d.md", "# title")
    found = resolve_sources([text, str(jsonl), js, md])
    assert [s.kind for s in found] == ["text", "jsonl", "json", "text"]
    assert [s.path for s in found] == [text, jsonl, js, md]
    assert all(s.name == str(s.path) for s in found)


def test_resolve_directory_is_recursive_sorted_and_filtered(tmp_path):
    root = tmp_path / "corpus"
    wanted = [
        write(root / "a.txt", "a"),
        write(root / "b.md", "b"),
        write(root / "sub" / "c.rst", "c"),
        write(root / "sub" / "deeper" / "d.text", "d"),
        write(root / "sub" / "e.jsonl", '{"text": "e"}\n'),
        write(root / "z.json", '[{"text": "z"}]'),
    ]
    write(root / "notes.csv", "not,text")
    write(root / "image.png", "binary-ish")
    write(root / ".hidden" / "secret.txt", "hidden dir")
    write(root / ".dotfile.txt", "hidden file")
    found = resolve_sources([root])
    assert [s.path for s in found] == sorted(wanted)
    assert {s.kind for s in found} == {"text", "jsonl", "json"}


def test_resolve_glob(tmp_path):
    a = write(tmp_path / "part-2.txt", "two")
    b = write(tmp_path / "part-1.txt", "one")
    write(tmp_path / "other.txt", "other")
    nested = write(tmp_path / "deep" / "part-3.txt", "three")
    found = resolve_sources([str(tmp_path / "part-*.txt")])
    assert [s.path for s in found] == [b, a]
    found = resolve_sources([str(tmp_path / "**" / "part-*.txt")])
    assert [s.path for s in found] == sorted([a, b, nested])


def test_resolve_keeps_argument_order(tmp_path):
    a = write(tmp_path / "a.txt", "a")
    b = write(tmp_path / "b.txt", "b")
    assert [s.path for s in resolve_sources([b, a])] == [b, a]


def test_resolve_builtin():
    (source,) = resolve_sources(["builtin:python-docs"])
    assert source == Source("builtin", "builtin:python-docs", None)


def test_unknown_builtin():
    with pytest.raises(LargeForgeError, match="unknown built-in corpus 'builtin:nope'") as info:
        resolve_sources(["builtin:nope"])
    assert "builtin:python-docs" in str(info.value)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(LargeForgeError, match="data file not found") as info:
        resolve_sources([missing])
    assert str(missing) in str(info.value)


def test_glob_without_match(tmp_path):
    write(tmp_path / "a.txt", "a")
    with pytest.raises(LargeForgeError, match="no file matches the data pattern"):
        resolve_sources([str(tmp_path / "*.jsonl")])


def test_directory_without_text_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LargeForgeError, match="holds no text or JSON files"):
        resolve_sources([empty])
    write(tmp_path / "other" / "x.csv", "a,b")
    write(tmp_path / "other" / ".hidden" / "x.txt", "hidden")
    with pytest.raises(LargeForgeError, match="holds no text or JSON files"):
        resolve_sources([tmp_path / "other"])


def test_empty_file(tmp_path):
    good = write(tmp_path / "good.txt", "good")
    empty = write(tmp_path / "empty.txt", "")
    with pytest.raises(LargeForgeError, match="data file is empty") as info:
        resolve_sources([good, empty])
    assert "empty.txt" in str(info.value)
    # also when the empty file comes from a directory
    with pytest.raises(LargeForgeError, match="data file is empty"):
        resolve_sources([tmp_path])


# --- iter_documents: text ----------------------------------------------------------------------


def test_text_split_on_separator_and_empty_documents_counted(tmp_path):
    path = write(tmp_path / "a.txt", "one<|endoftext|>two\n<|endoftext|><|endoftext|>  \n"
                                     "<|endoftext|>three")
    stats = {}
    assert docs([path], stats=stats) == ["one", "two\n", "three"]
    assert stats == {"documents": 3, "skipped_empty": 2, "files": 1}


def test_text_without_separator_is_one_document(tmp_path):
    path = write(tmp_path / "a.txt", "line one\nline two\n")
    assert docs([path]) == ["line one\nline two\n"]
    assert docs([path], doc_separator=None) == ["line one\nline two\n"]
    assert docs([path], doc_separator="\n") == ["line one", "line two"]


def test_custom_and_disabled_separator(tmp_path):
    path = write(tmp_path / "a.txt", "a<|endoftext|>b\n\n\nc")
    assert docs([path], doc_separator="\n\n\n") == ["a<|endoftext|>b", "c"]
    assert docs([path], doc_separator=None) == ["a<|endoftext|>b\n\n\nc"]


def test_stats_accumulate_over_files(tmp_path):
    a = write(tmp_path / "a.txt", "x<|endoftext|>y")
    b = write(tmp_path / "b.jsonl", '{"text": "z"}\n{"text": ""}\n')
    stats = {}
    assert docs([a, b], stats=stats) == ["x", "y", "z"]
    assert stats == {"documents": 3, "skipped_empty": 1, "files": 2}


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 11])
def test_separator_and_utf8_across_read_chunks(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sources_module, "_READ_CHUNK", chunk)
    pieces = ["héllo wörld", "日本語のテキスト", "emoji 🎉🐍 ok", "ascii", "€uro ∑ 𝄞 clef", "ü"]
    sep = "<|endoftext|>"
    path = write(tmp_path / "a.txt", sep.join(pieces))
    stats = {}
    assert docs([path], stats=stats) == pieces
    assert stats["documents"] == len(pieces)
    # a multi-byte separator too
    path2 = write(tmp_path / "b.txt", "§§".join(pieces))
    assert docs([path2], doc_separator="§§") == pieces
    # and no separator at all: the whole file, byte for byte
    assert docs([path], doc_separator=None) == [sep.join(pieces)]


def test_separator_straddling_chunk_boundary_every_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(sources_module, "_READ_CHUNK", 7)
    sep = "<|endoftext|>"
    for shift in range(8):
        body = "x" * shift + "first" + sep + "sécond" + sep + "third🎉"
        path = write(tmp_path / f"s{shift}.txt", body)
        assert docs([path]) == ["x" * shift + "first", "sécond", "third🎉"], shift


def test_default_chunk_boundary_with_real_size(tmp_path):
    chunk = sources_module._READ_CHUNK
    sep = "<|endoftext|>"
    # the separator starts 5 bytes before the 1 MiB boundary, an emoji straddles it later on
    first = "a" * (chunk - 5)
    second = "b" * (chunk - len(first) - len(sep) - 2) + "🎉" + "c" * 10
    path = write(tmp_path / "big.txt", first + sep + second + sep + "tail")
    assert docs([path]) == [first, second, "tail"]


def test_non_utf8_text_names_file_and_offset(tmp_path, monkeypatch):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"good text here, " + "caf\xe9".encode("latin-1") + b" more")
    with pytest.raises(LargeForgeError) as info:
        docs([path])
    message = str(info.value)
    assert str(path) in message and "UTF-8" in message
    assert "offset 19" in message
    # the offset counts from the start of the file, not of the read chunk
    monkeypatch.setattr(sources_module, "_READ_CHUNK", 4)
    with pytest.raises(LargeForgeError, match="offset 19"):
        docs([path])


@pytest.mark.parametrize("chunk", [3, 4, 1 << 20])
def test_truncated_utf8_at_end_of_file(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sources_module, "_READ_CHUNK", chunk)
    path = tmp_path / "cut.txt"
    path.write_bytes("abcdé".encode()[:-1])  # a lead byte with no continuation
    with pytest.raises(LargeForgeError, match="offset 4"):
        docs([path])


# --- iter_documents: JSONL and JSON ------------------------------------------------------------


def test_jsonl_text_field_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [{"text": "first", "id": 1}, {"text": "sécond 🎉"}, {"text": "   "}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in lines) + "\n\n",
                    encoding="utf-8")
    stats = {}
    assert docs([path], stats=stats) == ["first", "sécond 🎉"]
    assert stats["skipped_empty"] == 1
    other = write(tmp_path / "e.jsonl", '{"body": "B1"}\n{"body": "B2", "text": "T"}\n')
    assert docs([other], text_field="body") == ["B1", "B2"]


def test_jsonl_bad_json_names_file_and_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "ok"}\n\n{"text": broken}\n')
    with pytest.raises(LargeForgeError, match="invalid JSON") as info:
        docs([path])
    assert f"{path}:3:" in str(info.value)


def test_jsonl_missing_field_names_file_line_and_fields(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "ok"}\n{"prompt": "p", "answer": "a"}\n')
    with pytest.raises(LargeForgeError) as info:
        docs([path])
    message = str(info.value)
    assert f"{path}:2:" in message
    assert "'text'" in message and "answer, prompt" in message


def test_jsonl_wrong_types(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": 5}\n')
    with pytest.raises(LargeForgeError, match=r"d\.jsonl:1: field 'text' is int, not text"):
        docs([path])
    path = write(tmp_path / "e.jsonl", '["text"]\n')
    with pytest.raises(LargeForgeError, match=r"e\.jsonl:1: expected a JSON object"):
        docs([path])


def test_jsonl_non_utf8_offset(tmp_path):
    path = tmp_path / "d.jsonl"
    first = b'{"text": "ok"}\n'
    path.write_bytes(first + b'{"text": "caf\xe9"}\n')
    with pytest.raises(LargeForgeError, match="not valid UTF-8") as info:
        docs([path])
    assert f"offset {len(first) + 13}" in str(info.value)
    assert str(path) in str(info.value)


def test_json_array_and_single_object(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"text": "one"}, {"text": ""}, {"text": "two"}]),
                     encoding="utf-8")
    stats = {}
    assert docs([array], stats=stats) == ["one", "two"]
    assert stats["skipped_empty"] == 1
    single = write(tmp_path / "s.json", '{"content": "alone"}')
    assert docs([single], text_field="content") == ["alone"]


def test_json_errors(tmp_path):
    bad = write(tmp_path / "bad.json", '[\n{"text": "ok"},\n{"text": }\n]')
    with pytest.raises(LargeForgeError, match="invalid JSON") as info:
        docs([bad])
    assert f"{bad}:3:" in str(info.value)
    missing = write(tmp_path / "m.json", '[{"text": "ok"}, {"other": "x"}]')
    with pytest.raises(LargeForgeError, match=r"\(record 1\): no 'text' field"):
        docs([missing])
    latin = tmp_path / "l.json"
    latin.write_bytes(b'[{"text": "caf\xe9"}]')
    with pytest.raises(LargeForgeError, match="offset 14") as info:
        docs([latin])
    assert str(latin) in str(info.value)


def test_shared_data_real_files(shared_data):
    hh = shared_data / "hh_rlhf_sample.jsonl"
    lines = hh.read_text(encoding="utf-8").splitlines()
    stats = {}
    chosen = docs([hh], text_field="chosen", stats=stats)
    assert chosen[0] == json.loads(lines[0])["chosen"]
    assert stats["documents"] + stats["skipped_empty"] == len([x for x in lines if x.strip()])
    # the chat sample has no "text" field: the error names line 1 and the fields it does have
    chat = shared_data / "chat_sample.jsonl"
    with pytest.raises(LargeForgeError, match="set data.text_field") as info:
        docs([chat])
    assert f"{chat}:1:" in str(info.value) and "conversations, id" in str(info.value)
    alpaca = shared_data / "alpaca_sample.json"
    records = json.loads(alpaca.read_text(encoding="utf-8"))
    instructions = docs([alpaca], text_field="instruction")
    assert instructions == [r["instruction"] for r in records if r["instruction"].strip()]
    stories = shared_data / "tinystories_sample.txt"
    text = stories.read_text(encoding="utf-8")
    expected = [d for d in text.split("<|endoftext|>") if d.strip()]
    assert docs([stories]) == expected and len(expected) > 1000


# --- fingerprint -------------------------------------------------------------------------------


def test_fingerprint_follows_content_not_name(tmp_path):
    a = write(tmp_path / "a.txt", "some content")
    copy = tmp_path / "renamed.txt"
    shutil.copy(a, copy)
    other = write(tmp_path / "other.txt", "other content")
    fp = fingerprint(resolve_sources([a]))
    assert fingerprint(resolve_sources([copy])) == fp
    assert fingerprint(resolve_sources([other])) != fp
    assert fingerprint(resolve_sources([a]), extra="x") != fp
    a.write_text("some content!", encoding="utf-8")
    assert fingerprint(resolve_sources([a])) != fp


def test_fingerprint_depends_on_order_and_kind(tmp_path):
    a = write(tmp_path / "a.txt", "one")
    b = write(tmp_path / "b.txt", "two")
    assert fingerprint(resolve_sources([a, b])) != fingerprint(resolve_sources([b, a]))
    as_jsonl = tmp_path / "a.jsonl"
    shutil.copy(a, as_jsonl)
    assert Source("text", "a", a).fingerprint() == Source("jsonl", "a", as_jsonl).fingerprint()
    assert fingerprint(resolve_sources([a])) != fingerprint(resolve_sources([as_jsonl]))


def test_fingerprint_of_large_file_streams_whole_content(tmp_path, monkeypatch):
    monkeypatch.setattr(sources_module, "_READ_CHUNK", 16)
    a = write(tmp_path / "a.txt", "x" * 100)
    b = write(tmp_path / "b.txt", "x" * 99 + "y")  # differs only after several chunks
    assert fingerprint(resolve_sources([a])) != fingerprint(resolve_sources([b]))


def test_builtin_fingerprint_is_stable():
    fp = fingerprint(resolve_sources(["builtin:python-docs"]))
    assert fp == fingerprint(resolve_sources(["builtin:python-docs"]))
    assert len(fp) == 20
