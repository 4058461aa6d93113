"""The training loop end to end on real text: run directory, logs, best/final, accumulation,
early stopping and --verify-only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from largeforge.config import load_recipe
from largeforge.training.loop import train


def tiny_recipe(data: Path, out: Path, **train_overrides: object) -> dict:
    return {
        "model": {"preset": "tiny", "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                  "hidden_dim": 128, "max_seq_len": 64},
        "tokenizer": {"vocab_size": 300},
        "data": {"train": [str(data)], "seq_len": 32, "split": "tail"},
        "train": {"batch_size": 8, "max_steps": 30, "lr": 3e-3, "warmup_steps": 5,
                  "eval_every": 10, "eval_batches": 4, "log_every": 5, **train_overrides},
        "output": {"dir": str(out), "name": "run"},
    }


@pytest.fixture
def corpus(tmp_path, shared_data) -> Path:
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:120_000]
    path = tmp_path / "shakespeare.txt"
    path.write_text(text, encoding="utf-8")
    return path


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_pretraining_run_end_to_end(corpus, tmp_path):
    result = train(load_recipe(tiny_recipe(corpus, tmp_path / "runs"), environ={}))
    run = tmp_path / "runs" / "run"
    assert result.run_dir == run and result.steps == 30
    assert (run / "recipe.yaml").is_file()
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    records = metrics(run)
    train_records = [r for r in records if "loss" in r]
    val_records = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train_records] == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in val_records] == [10, 20, 30]
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    for r in train_records:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1.5 and r["lr"] > 0
    for r in val_records:
        assert r["val_ppl"] == pytest.approx(torch.tensor(r["val_loss"]).exp().item(), rel=1e-6)
    assert result.best_val_loss == min(r["val_loss"] for r in val_records)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-30"

    # best/ and final/ are Hugging Face model directories that load with our exact logits.
    ids = torch.randint(0, 300, (2, 24))
    result.model.eval()
    with torch.no_grad():
        ours = result.model(ids).logits
        final = AutoModelForCausalLM.from_pretrained(run / "final")
        assert torch.equal(final(ids).logits, ours)
        best = AutoModelForCausalLM.from_pretrained(run / "best")
        assert best(ids).logits.shape == ours.shape
    for name in ("final", "best"):
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json"):
            assert (run / name / f).is_file(), f"{name}/{f}"
    tok = AutoTokenizer.from_pretrained(run / "final")
    assert final.generation_config.eos_token_id == tok.eos_token_id


def test_gradient_accumulation_matches_the_larger_batch(corpus, tmp_path):
    def losses(batch: int, accum: int, name: str) -> list[float]:
        r = tiny_recipe(corpus, tmp_path / name, batch_size=batch, grad_accum=accum,
                        max_steps=4, log_every=1, eval_every=100, grad_clip=0.0,
                        precision="fp32")
        train(load_recipe(r, environ={}))
        return [m["loss"] for m in metrics(tmp_path / name / "run") if "loss" in m]

    big = losses(8, 1, "a")
    small = losses(4, 2, "b")
    assert big == pytest.approx(small, abs=1e-5)


def test_early_stopping_when_val_loss_stops_improving(corpus, tmp_path):
    r = tiny_recipe(corpus, tmp_path / "runs", lr=0.3, warmup_steps=0, max_steps=200,
                    eval_every=2, early_stopping_patience=2, min_lr=0.3, weight_decay=0.0)
    result = train(load_recipe(r, environ={}))
    assert result.stopped_early and result.steps < 200
    state = json.loads((tmp_path / "runs" / "run" / "run.json").read_text())
    assert state["status"] == "stopped_early"
    assert (tmp_path / "runs" / "run" / "final" / "model.safetensors").is_file()


def test_verify_only_checks_without_writing(corpus, tmp_path):
    result = train(load_recipe(tiny_recipe(corpus, tmp_path / "runs"), environ={}),
                   verify_only=True)
    assert result.verified_only and result.parameters > 0
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # two compilations, about 30 s
def test_compiled_training_matches_eager_and_saves_a_plain_model(corpus, tmp_path):
    """train.compile compiles the decoder in place (the fused output layer and loss stay
    eager): the same losses as the eager loop, and a final model with the usual weight names."""
    losses = {}
    for compile_ in (False, True):
        out = tmp_path / ("compiled" if compile_ else "eager")
        recipe = tiny_recipe(corpus, out, max_steps=6, log_every=1, eval_every=6,
                             compile=compile_, precision="fp32")
        train(load_recipe(recipe, environ={}))
        losses[compile_] = [r["loss"] for r in metrics(out / "run") if "loss" in r]
    assert len(losses[True]) == 6
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "compiled" / "run" / "final")
    assert not any("_orig_mod" in name for name in model.state_dict())
