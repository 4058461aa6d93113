"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing half-written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import run_cli


def recipe(tmp_path: Path, train_files: list[str], **sections: dict) -> Path:
    body = {
        "model": {"preset": "tiny", "dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 64},
        "tokenizer": {"vocab_size": 280},
        "data": {"train": train_files, "seq_len": 16, "split": "tail"},
        "train": {"batch_size": 2, "max_steps": 2, "eval_every": 2, "log_every": 1},
        "output": {"dir": str(tmp_path / "runs"), "name": "r"},
    }
    for key, value in sections.items():
        body[key].update(value)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    return path


@pytest.fixture
def good_text(tmp_path) -> Path:
    path = tmp_path / "good.txt"
    path.write_text("The quick brown fox jumps over the lazy dog.\n" * 400, encoding="utf-8")
    return path


def assert_clean_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert "error:" in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


def test_missing_data(tmp_path):
    proc = run_cli("train", "--config", str(recipe(tmp_path, [str(tmp_path / "nope.txt")])))
    assert_clean_error(proc, "nope.txt", "not found")
    assert not (tmp_path / "runs").exists()


def test_empty_data(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = run_cli("train", "--config", str(recipe(tmp_path, [str(empty)])))
    assert_clean_error(proc, "empty.txt", "empty")
    assert not (tmp_path / "runs").exists()


def test_non_utf8_data(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 10)
    proc = run_cli("train", "--config", str(recipe(tmp_path, [str(bad)])))
    assert_clean_error(proc, "latin1.txt", "UTF-8")
    assert bad.read_bytes() == "caf\xe9 au lait\n".encode("latin-1") * 10


def test_no_data_at_all(tmp_path):
    proc = run_cli("train", "--config", str(recipe(tmp_path, [])))
    assert_clean_error(proc, "data.train")


def test_unknown_key_and_wrong_type(tmp_path, good_text):
    path = recipe(tmp_path, [str(good_text)], train={"learning_rate": 1})
    assert_clean_error(run_cli("train", "--config", str(path)), "train.learning_rate", str(path))
    path = recipe(tmp_path, [str(good_text)], train={"max_steps": "many"})
    assert_clean_error(run_cli("train", "--config", str(path)), "train.max_steps", "'many'")


def test_vocabulary_smaller_than_the_special_tokens(tmp_path, good_text):
    path = recipe(tmp_path, [str(good_text)], tokenizer={"vocab_size": 3})
    assert_clean_error(run_cli("train", "--config", str(path)), "vocab")
    assert_clean_error(
        run_cli("tokenizer", "train", "--data", str(good_text), "--vocab-size", "3",
                "--output", str(tmp_path / "tok")),
        "vocab",
    )
    assert not (tmp_path / "tok").exists()


def test_sequence_longer_than_the_model_allows(tmp_path, good_text):
    path = recipe(tmp_path, [str(good_text)], data={"seq_len": 128})
    for extra in ([], ["--verify-only"]):
        proc = run_cli("train", "--config", str(path), *extra)
        assert_clean_error(proc, "data.seq_len 128", "maximum sequence length 64")


def test_output_directory_with_another_run_is_refused_unless_overwrite(tmp_path, good_text):
    path = recipe(tmp_path, [str(good_text)])
    assert run_cli("train", "--config", str(path)).returncode == 0
    run_dir = tmp_path / "runs" / "r"
    metrics = (run_dir / "metrics.jsonl").read_text()
    other = recipe(tmp_path, [str(good_text)], train={"max_steps": 3})
    assert_clean_error(run_cli("train", "--config", str(other)), "already holds a run",
                       "--overwrite")
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    proc = run_cli("train", "--config", str(other), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert "max_steps: 3" in (run_dir / "recipe.yaml").read_text()


def test_output_directory_with_foreign_files_is_never_touched(tmp_path, good_text):
    foreign = tmp_path / "runs" / "r"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    path = recipe(tmp_path, [str(good_text)])
    for extra in ([], ["--overwrite"]):
        assert_clean_error(run_cli("train", "--config", str(path), *extra), "no LargeForge run")
    assert (foreign / "notes.txt").read_text() == "mine"


def test_nothing_to_resume(tmp_path, good_text):
    path = recipe(tmp_path, [str(good_text)])
    assert_clean_error(run_cli("train", "--config", str(path), "--resume"), "nothing to resume")


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli("--debug", "train", "--config", str(recipe(tmp_path, [])))
    assert proc.returncode == 2 and "Traceback" in proc.stderr
