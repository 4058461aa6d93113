"""Outputs honour the umask, and no library warning reaches the user (issue 18, class 8).

safetensors and `tempfile` write 0600 files and 0700 directories, which other users and a
serving container cannot read; every output here must get the usual modes (0666 and 0777 less
the umask) however it was written. Warnings we have handled (transformers' renamed arguments)
must not reach a terminal."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cli_contract import TEXT, TINY_TRAIN


def run_with_umask(umask: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "largeforge.cli.main", *args], cwd=cwd, capture_output=True,
        text=True, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        preexec_fn=lambda: os.umask(umask),
    )


def modes(root: Path) -> dict[str, str]:
    """The mode of every path under `root`, itself included."""
    return {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")]}


def assert_umask_modes(root: Path, umask: int) -> None:
    wrong = {}
    for path, mode in modes(root).items():
        expected = (0o777 if Path(path).is_dir() else 0o666) & ~umask
        if int(mode, 8) != expected:
            wrong[path] = f"{mode}, expected {oct(expected)}"
    assert not wrong, wrong


def no_warnings(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    text = proc.stdout + proc.stderr
    assert "Warning" not in text and "deprecated" not in text, text


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained under umask 022, in a work directory of its own."""
    root = tmp_path_factory.mktemp("umask")
    (root / "small.txt").write_text(TEXT, encoding="utf-8")
    pairs = "".join(json.dumps({"instruction": f"Say hi {i}", "output": "Hi there"}) + "\n"
                    for i in range(8))
    (root / "sft.jsonl").write_text(pairs, encoding="utf-8")
    no_warnings(run_with_umask(0o022, *TINY_TRAIN, "--output-dir", "runs", "--name", "base",
                               cwd=root))
    return root


def test_a_run_and_its_exports_honour_the_umask(trained: Path) -> None:
    assert_umask_modes(trained / "runs" / "base", 0o022)
    for args, output in ((["export", "runs/base", "--format", "hf", "--output", "hf"], "hf"),
                         (["export", "runs/base", "--format", "gguf", "--output", "m.gguf"],
                          "m.gguf"),
                         (["tokenizer", "train", "--data", "small.txt", "--vocab-size", "300",
                           "--output", "tok"], "tok"),
                         (["data", "prepare", "sft.jsonl", "--output", "prep"], "prep")):
        no_warnings(run_with_umask(0o022, *args, cwd=trained))
        assert_umask_modes(trained / output, 0o022)


def test_a_stricter_umask_is_honoured_too(trained: Path) -> None:
    no_warnings(run_with_umask(0o027, "export", "runs/base", "--format", "hf", "--output",
                               "hf027", cwd=trained))
    assert_umask_modes(trained / "hf027", 0o027)


def test_lora_training_merging_and_onnx_export_print_no_library_warning(trained: Path) -> None:
    no_warnings(run_with_umask(0o022, "train", "sft", "--model", "runs/base", "--dataset",
                               "sft.jsonl", "--max-steps", "2", "--output", "runs/lora",
                               cwd=trained))
    assert_umask_modes(trained / "runs" / "lora", 0o022)
    no_warnings(run_with_umask(0o022, "merge", "--adapter", "runs/lora", "--output", "merged",
                               cwd=trained))
    assert_umask_modes(trained / "merged", 0o022)
    no_warnings(run_with_umask(0o022, "export", "merged", "--format", "onnx", "--output", "onnx",
                               cwd=trained))
    assert_umask_modes(trained / "onnx", 0o022)
