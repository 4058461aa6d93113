"""`largeforge tokenizer train` through the real entry point."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from conftest import run_cli


@pytest.fixture
def text_file(tmp_path, shared_data):
    path = tmp_path / "shakespeare.txt"
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:30_000]
    path.write_text(text, encoding="utf-8")
    return path


def assert_clean_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def test_train_writes_a_loadable_tokenizer(tmp_path, text_file):
    out = tmp_path / "tok"
    proc = run_cli("tokenizer", "train", "--data", str(text_file), "--vocab-size", "400",
                   "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "400 tokens" in proc.stdout and "1 documents" in proc.stdout
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert len(tokenizer) == 400
    assert tokenizer.eos_token == "</s>" and tokenizer.eos_token_id == 3
    text = "ROMEO: Wherefore art thou — ünïcode 🎉"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode("First Citizen")) < len("First Citizen")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shakespeare.txt", "tok"]


def test_train_from_several_sources_and_jsonl_field(tmp_path, text_file):
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"record number {i} zyzzyva"})
                               for i in range(50)), encoding="utf-8")
    out = tmp_path / "tok"
    proc = run_cli("tokenizer", "train", "--data", str(text_file), "--data", str(jsonl),
                   "--text-field", "body", "--vocab-size", "350", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "51 documents" in proc.stdout
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert "zyzzyva" in tokenizer.decode(tokenizer.encode(" zyzzyva"))
    assert len(tokenizer.encode(" zyzzyva")) <= 3  # the frequent word got merged


def test_missing_file(tmp_path):
    out = tmp_path / "tok"
    proc = run_cli("tokenizer", "train", "--data", str(tmp_path / "nope.txt"),
                   "--vocab-size", "300", "--output", str(out))
    assert_clean_error(proc, "nope.txt", "not found")
    assert list(tmp_path.iterdir()) == []


def test_vocab_too_small(tmp_path, text_file):
    out = tmp_path / "tok"
    proc = run_cli("tokenizer", "train", "--data", str(text_file), "--vocab-size", "3",
                   "--output", str(out))
    assert_clean_error(proc, "vocab size 3", "260")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shakespeare.txt"]


def test_non_empty_output(tmp_path, text_file):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "mine.txt").write_text("keep me", encoding="utf-8")
    proc = run_cli("tokenizer", "train", "--data", str(text_file), "--vocab-size", "300",
                   "--output", str(out))
    assert_clean_error(proc, "not empty", str(out))
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert (out / "mine.txt").read_text(encoding="utf-8") == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shakespeare.txt", "tok"]


def test_non_utf8_data(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    out = tmp_path / "tok"
    proc = run_cli("tokenizer", "train", "--data", str(bad), "--vocab-size", "300",
                   "--output", str(out))
    assert_clean_error(proc, "latin1.txt", "UTF-8", "offset 3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin1.txt"]
