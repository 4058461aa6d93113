"""One set of checks per input, whichever command takes it (issue 18, class 7): contradictory
filters, flags named as typed, local paths never mistaken for hub ids, and the same data flag
in every training command. Each refusal keeps the error contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_contract import TEXT, refused, save_tiny_model, succeeds


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "small.txt").write_text(TEXT, encoding="utf-8")
    records = [{"text": f"Story {i}: the fox walked to the river and drank the cold water."}
               for i in range(20)]
    (tmp_path / "docs.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    pairs = [{"instruction": f"Say hello {i}", "output": "Hello there!"} for i in range(8)]
    (tmp_path / "sft.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in pairs), encoding="utf-8")
    return tmp_path


def test_filters_that_keep_nothing_are_refused_before_anything_is_written(
        workdir: Path) -> None:
    line = refused(workdir, "data", "prepare", "docs.jsonl", "--output", "prep",
                   "--min-chars", "100", "--max-chars", "10")
    assert "--max-chars 10 is below --min-chars 100" in line
    line = refused(workdir, "data", "prepare", "docs.jsonl", "--output", "prep",
                   "--min-chars", "100000")
    assert "no record of 20 is left after cleaning (too_short 20)" in line
    line = refused(workdir, "data", "prepare", "docs.jsonl", "--output", "prep",
                   "--min-alpha-ratio", "1.5")
    assert "--min-alpha-ratio must be in [0, 1]" in line
    line = refused(workdir, "data", "prepare", "docs.jsonl", "--output", "prep",
                   "--near-dedup", "2")
    assert "--near-dedup must be in [0, 1]" in line
    succeeds(workdir, "data", "prepare", "docs.jsonl", "--output", "prep", "--min-chars", "10",
             "--max-chars", "1000", "--near-dedup", "0")
    assert (workdir / "prep" / "train.jsonl").stat().st_size > 0


def test_an_error_names_the_flag_as_it_was_typed(workdir: Path, model_dir: Path) -> None:
    sft = ["train", "sft", "--model", str(model_dir), "--dataset", "sft.jsonl", "--verify-only"]
    line = refused(workdir, *sft, "--lora-r", "0")
    assert "lora.r (from flag --lora-r)" in line
    line = refused(workdir, *sft, "--lora-dropout", "1.5")
    assert "lora.dropout (from flag --lora-dropout)" in line
    line = refused(workdir, *sft, "--data", "sft.jsonl")
    assert "--dataset and --data both set data.train: give one" in line
    succeeds(workdir, *sft, "--lora-r", "4")


def test_every_training_command_takes_data_and_dataset(workdir: Path, model_dir: Path) -> None:
    out = succeeds(workdir, "train", "sft", "--model", str(model_dir), "--data", "sft.jsonl",
                   "--verify-only")
    assert "ready to train" in out
    out = succeeds(workdir, "train", "--dataset", "small.txt", "--verify-only",
                   "--set", "tokenizer.vocab_size=300")
    assert "ready to train" in out


def test_a_missing_local_model_is_not_looked_up_on_the_hub(workdir: Path) -> None:
    (workdir / "runs").mkdir()
    for args in (["generate", "--model", "runs/typo", "--prompt", "Once"],
                 ["eval", "--model", "runs/typo", "--data", "small.txt"],
                 ["export", "runs/typo", "--format", "hf", "--output", "out"],
                 ["generate", "--model", "./nothing", "--prompt", "Once"]):
        line = refused(workdir, *args)
        assert "not found: no such directory" in line and "huggingface" not in line.lower()


def test_recipe_values_that_cannot_work_are_refused_by_verify_and_by_train(
        workdir: Path, model_dir: Path) -> None:
    train = ["train", "--data", "small.txt", "--set", "tokenizer.vocab_size=300"]
    line = refused(workdir, *train, "--verify-only", "--set", "train.lr=inf")
    assert "train.lr" in line and "finite number" in line
    line = refused(workdir, *train, "--name", "../outside")
    assert "a run name is one directory name" in line
    line = refused(workdir, *train, "--set", "train.threads=100000")
    assert "train.threads 100000 is more than the" in line
    line = refused(workdir, "train", "sft", "--model", str(model_dir), "--dataset", "sft.jsonl",
                   "--chat-template", "no-such-template", "--verify-only")
    assert "unknown chat template 'no-such-template'" in line
