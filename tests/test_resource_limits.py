"""Resource limits (issue 18, class 4): what cannot fit is refused before any work starts, with
one `error:` line naming the setting to change; what can be bounded (a tokenizer's input, read
in pieces) is bounded instead of refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli_contract import TEXT, TINY_TRAIN, refused, succeeds


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "small.txt").write_text(TEXT, encoding="utf-8")
    return tmp_path


def test_a_vocabulary_too_large_to_allocate_is_refused(workdir: Path) -> None:
    line = refused(workdir, "tokenizer", "train", "--data", "small.txt",
                   "--vocab-size", "4000000000", "--output", "tok")
    assert "vocab size 4000000000 is too large: at most 1000000" in line
    line = refused(workdir, *TINY_TRAIN, "--set", "tokenizer.vocab_size=4000000000")
    assert "tokenizer.vocab_size" in line and "1000000" in line
    line = refused(workdir, *TINY_TRAIN, "--set", "model.vocab_size=4000000000", "--verify-only")
    assert "model.vocab_size" in line
    succeeds(workdir, "tokenizer", "train", "--data", "small.txt", "--vocab-size", "300",
             "--output", "tok")


@pytest.mark.parametrize("verify_only", [False, True])
def test_a_batch_or_model_beyond_the_memory_is_refused_before_it_is_built(
        workdir: Path, verify_only: bool) -> None:
    verify = ["--verify-only"] if verify_only else []
    line = refused(workdir, *TINY_TRAIN, *verify, "--set", "train.batch_size=1000000000000")
    assert "train.batch_size 1000000000000 x data.seq_len 16 needs at least" in line
    assert "lower train.batch_size" in line and "train.grad_accum" in line
    line = refused(workdir, *TINY_TRAIN, *verify, "--set", "model.dim=10000000")
    assert "parameters: training it needs at least" in line and "model.dim" in line
    line = refused(workdir, *TINY_TRAIN, *verify, "--set", "data.seq_len=100000")
    assert "data.seq_len 100000 is above the model's maximum sequence length" in line
    if not verify_only:  # corrected: the run starts without --overwrite
        succeeds(workdir, *TINY_TRAIN, "--set", "train.batch_size=4")


def test_the_memory_bounds_are_lower_bounds_of_what_a_run_allocates() -> None:
    """A bound above what a model really holds would refuse runs that fit."""
    import torch

    from largeforge.models import ModelConfig, build_model, count_parameters

    for config in (ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300),
                   ModelConfig(dim=96, n_layers=3, n_heads=6, hidden_dim=200, vocab_size=517,
                               tie_embeddings=False)):
        with torch.device("meta"):
            built = build_model(config)
        assert config.parameter_count == count_parameters(built)["total"]


def test_a_tokenizer_reads_a_long_line_in_pieces(workdir: Path) -> None:
    """One 50 MB line took 4.5 GB to train a tokenizer on (480 MB in pieces): the trainer sees
    pieces of at most TEXT_PIECE_CHARS, cut at line breaks or spaces, the text unchanged."""
    from largeforge.tokenizer import text_pieces

    text = ("word " * 50 + "\n") * 40 + "x" * 700 + " tail"
    pieces = list(text_pieces(text, limit=256))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 256
    assert all(p.endswith(("\n", "x")) or " " not in p[-1:] for p in pieces[:-1])
    assert pieces[0].endswith("\n")  # cut after a line break where there is one
    (workdir / "line.txt").write_text("the quick brown fox jumps " * 60_000, encoding="utf-8")
    out = succeeds(workdir, "tokenizer", "train", "--data", "line.txt", "--vocab-size", "300",
                   "--output", "tok")
    assert "300 tokens" in out or "tokens from 1 documents" in out
