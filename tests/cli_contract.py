"""The error contract of every command, checked in one place: a refused command exits with
code 2, prints exactly one `error:` line and no traceback, and leaves every file as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path

from conftest import run_cli

# A text to train on and the smallest `train` command that runs on it in seconds.
TEXT = "Once upon a time there was a little fox who lived in the forest.\n" * 60
TINY_TRAIN = ["train", "--data", "small.txt", "--preset", "tiny", "--max-steps", "2",
              "--set", "tokenizer.vocab_size=300", "--set", "data.seq_len=16",
              "--set", "model.dim=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
              "--set", "model.n_kv_heads=1", "--set", "train.batch_size=2"]


def save_tiny_model(root: Path) -> Path:
    """A random 2-layer Llama with a tokenizer trained on TEXT, saved to `root`."""
    import tiny_models

    tokenizer = tiny_models.make_tokenizer([TEXT])
    tiny_models.make_model(len(tokenizer), 64).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with a hash of its bytes, and every directory."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


def refused(cwd: Path, *args: str, watch: Path | None = None, code: int = 2) -> str:
    """Run the command in `cwd`; assert the error contract over `watch` (default `cwd`): exit
    `code`, one `error:` line, no traceback, nothing changed on disk. Returns the error line."""
    root = watch or cwd
    before = snapshot(root)
    proc = run_cli(*args, cwd=cwd)
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert snapshot(root) == before, "the failed command changed files"
    return errors[0]


def succeeds(cwd: Path, *args: str) -> str:
    """Run the command in `cwd`, assert it exits 0 and return its stdout."""
    proc = run_cli(*args, cwd=cwd)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    return proc.stdout
