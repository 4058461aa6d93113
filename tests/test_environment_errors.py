"""Errors of the machine rather than of the recipe (issue 18, classes 1 and 5): what the file
system refuses (a file where a directory is expected, an existing path) and devices this machine
does not have. Each is one `error:` line and exit code 2, with no traceback, nothing new on disk
and the input unchanged; the corrected command then succeeds."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli_contract import TEXT, TINY_TRAIN, refused, save_tiny_model
from conftest import run_cli

TRAIN = TINY_TRAIN


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "small.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "afile").write_text("not a directory\n", encoding="utf-8")
    return tmp_path


def test_a_file_where_a_directory_is_expected(workdir: Path) -> None:
    line = refused(workdir, "tokenizer", "train", "--data", "small.txt", "--vocab-size", "300",
                   "--output", "afile")
    assert "afile" in line and "directory" in line
    line = refused(workdir, *TRAIN, "--output-dir", "afile", "--name", "run")
    assert "afile" in line and "directory is expected" in line
    line = refused(workdir, "data", "prepare", "small.txt", "--output", "afile/prepared")
    assert "afile" in line
    # Corrected, the same commands succeed without --overwrite.
    for args in (["tokenizer", "train", "--data", "small.txt", "--vocab-size", "300",
                  "--output", "tok"], [*TRAIN, "--output-dir", "runs", "--name", "run"]):
        proc = run_cli(*args, cwd=workdir)
        assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.mark.parametrize("device", ["tpu9", "cuda", "cuda:3", "mps"])
def test_a_device_this_machine_lacks_is_named_with_the_ones_it_has(workdir: Path,
                                                                    model_dir: Path,
                                                                    device: str) -> None:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available() and device != "cuda:3":
        pytest.skip("this machine has CUDA")
    line = refused(workdir, "generate", "--model", str(model_dir), "--prompt", "Once",
                   "--device", device)
    assert f"device {device!r} is not available here" in line and "cpu" in line


def test_unknown_devices_in_eval_and_train(workdir: Path, model_dir: Path) -> None:
    line = refused(workdir, "eval", "--model", str(model_dir), "--data", "small.txt",
                   "--device", "cuda:7")
    assert "'cuda:7' is not available here" in line
    line = refused(workdir, *TRAIN, "--output-dir", "runs", "--name", "r",
                   "--set", "train.device=xpu:5")
    assert "'xpu:5' is not available here" in line
    proc = run_cli("generate", "--model", str(model_dir), "--prompt", "Once", "--device", "cpu",
                   "--max-new-tokens", "3", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
