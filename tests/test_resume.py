"""Exact resume: a run killed with SIGKILL and resumed logs the same losses, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import checkpoint_reached, kill_cli_when, logged_losses, run_cli


def write_recipe(path: Path, data: Path, out: Path, name: str, **train: object) -> Path:
    recipe = {
        "model": {"preset": "tiny", "dim": 96, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                  "hidden_dim": 256, "max_seq_len": 64},
        "tokenizer": {"vocab_size": 300},
        "data": {"train": [str(data)], "seq_len": 64, "split": "tail"},
        "train": {"batch_size": 16, "max_steps": 60, "lr": 3e-3, "warmup_steps": 5,
                  "eval_every": 10, "eval_batches": 2, "log_every": 1, "save_every": 4,
                  "threads": 1, **train},
        "output": {"dir": str(out), "name": name},
    }
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path




@pytest.fixture
def corpus(tmp_path, shared_data) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text((shared_data / "tinyshakespeare.txt").read_text()[:150_000], encoding="utf-8")
    return path


def test_sigkill_and_resume_reproduces_the_uninterrupted_run(corpus, tmp_path):
    out = tmp_path / "runs"
    recipe = write_recipe(tmp_path / "r.yaml", corpus, out, "whole")
    # The reference: one uninterrupted run.
    done = run_cli("train", "--config", str(recipe))
    assert done.returncode == 0, done.stderr

    # Same recipe under another name, killed hard once a few checkpoints exist, somewhere between
    # two checkpoints, maybe inside a write.
    kill_cli_when(["train", "--config", str(recipe), "--name", "killed"],
                  checkpoint_reached(out / "killed", 12), settle=0.13)
    killed = out / "killed"
    assert not (killed / "final").exists(), "the run finished before it was killed"
    killed_at = max(step for step, _, _ in logged_losses(killed))

    resumed = run_cli("train", "--config", str(recipe), "--name", "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout

    assert killed_at < 60
    # Bit for bit: floats compared exactly.
    assert logged_losses(killed) == logged_losses(out / "whole")
    a = load_file(out / "whole" / "final" / "model.safetensors")
    b = load_file(killed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_resume_refuses_a_different_recipe_and_names_the_difference(corpus, tmp_path):
    out = tmp_path / "runs"
    recipe = write_recipe(tmp_path / "r.yaml", corpus, out, "r", max_steps=8)
    assert run_cli("train", "--config", str(recipe)).returncode == 0
    before = (out / "r" / "metrics.jsonl").read_text()
    proc = run_cli("train", "--config", str(recipe), "--resume", "--set", "train.lr=0.01")
    assert proc.returncode == 2
    assert "train.lr: 0.003 in the checkpoint, 0.01 now" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "r" / "metrics.jsonl").read_text() == before


def test_resume_ignores_an_interrupted_checkpoint_write(corpus, tmp_path):
    out = tmp_path / "runs"
    recipe = write_recipe(tmp_path / "r.yaml", corpus, out, "r", max_steps=8)
    assert run_cli("train", "--config", str(recipe), "--max-steps", "8").returncode == 0
    ckpts = out / "r" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-8"
    # A crash in the middle of writing step 12 leaves only a temp dir; latest is untouched.
    broken = ckpts / ".step-12.tmp-abc"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\0" * 10)
    from largeforge.runs import latest_checkpoint

    assert latest_checkpoint(out / "r") == ckpts / "step-8"


def test_a_resumed_run_keeps_the_precision_it_started_with(corpus, tmp_path):
    """`precision: auto` is measured when a run starts; a resume takes the run's precision from
    run.json instead of measuring again (under load the measurement could differ)."""
    out = tmp_path / "runs"
    recipe = write_recipe(tmp_path / "r.yaml", corpus, out, "run", max_steps=40, save_every=2)
    kill_cli_when(["train", "--config", str(recipe)], checkpoint_reached(out / "run", 2))
    state_file = out / "run" / "run.json"
    state = json.loads(state_file.read_text())
    started = state["hardware"]["precision"]
    other = "fp32" if started == "bf16" else "bf16"
    state["hardware"]["precision"] = other  # as if the start had measured the other one
    state_file.write_text(json.dumps(state), encoding="utf-8")
    resumed = run_cli("train", "--config", str(recipe), "--resume",
                      "--set", "train.max_steps=40")
    assert resumed.returncode == 0, resumed.stderr
    assert f"precision {other}, as the run started" in resumed.stdout
    assert f"precision {other}," in resumed.stdout.split("device cpu,")[1]
