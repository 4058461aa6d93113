"""The README's main command, shortened: trains on Python's own docs, reports, saves, samples."""

from __future__ import annotations

import json

from transformers import AutoModelForCausalLM

from conftest import run_cli


def test_quickstart_trains_reports_saves_and_samples(tmp_path):
    proc = run_cli(
        "quickstart", "--output-dir", str(tmp_path / "runs"),
        "--set", "train.max_steps=30", "--set", "train.eval_every=15",
        "--set", "train.log_every=5", "--set", "tokenizer.vocab_size=512",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "step 30/30" in out and "tok/s" in out and "MFU" in out and "ETA" in out
    assert "val loss" in out
    run = tmp_path / "runs" / "quickstart"
    assert AutoModelForCausalLM.from_pretrained(run / "final").config.vocab_size == 512
    samples = out.split("samples", 1)[1]
    assert "Return the" in samples and "The built-in function" in samples
    status = json.loads((run / "run.json").read_text())
    assert status["status"] == "completed" and status["last_val_loss"] > 0
    assert "Writing model shards" not in proc.stderr + out  # no library progress-bar noise
