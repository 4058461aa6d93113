"""Knowledge distillation: the loss by hand, a student that beats cross-entropy alone with a
teacher the tool pretrained, and a teacher with another tokenizer refused."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import run_cli
from largeforge.training.distill import distillation_loss
from tiny_models import make_family_model, make_tokenizer


def test_distillation_loss_by_hand():
    student = torch.log(torch.tensor([[0.5, 0.5]]))
    teacher = torch.log(torch.tensor([[0.75, 0.25]]))
    labels = torch.tensor([0])
    loss, kl, ce = distillation_loss(student, teacher, labels, temperature=1.0, alpha=0.5)
    expected_kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl.item() == pytest.approx(expected_kl, abs=1e-6)
    assert ce.item() == pytest.approx(math.log(2), abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * expected_kl + 0.5 * math.log(2), abs=1e-6)
    # T^2 scaling, targets masked out with -100, and a student equal to its teacher owes no KL.
    _, kl_t2, _ = distillation_loss(student, teacher, labels, temperature=2.0)
    p = torch.softmax(torch.log(torch.tensor([0.75, 0.25])) / 2, -1)
    assert kl_t2.item() == pytest.approx(4 * (p * (p / 0.5).log()).sum().item(), abs=1e-6)
    same, kl0, _ = distillation_loss(torch.cat([teacher, teacher]), torch.cat([teacher, teacher]),
                                     torch.tensor([1, -100]), alpha=1.0)
    assert kl0.item() == pytest.approx(0.0, abs=1e-7) and same.item() == pytest.approx(0.0,
                                                                                      abs=1e-7)


STUDENT = ["--max-steps", "150", "--batch-size", "16", "--seq-len", "64", "--lr", "3e-3",
           "--set", "model.dim=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
           "--set", "model.n_kv_heads=1", "--set", "model.hidden_dim=64",
           "--set", "train.warmup_steps=10", "--set", "train.eval_every=50",
           "--set", "train.log_every=50", "--precision", "fp32"]


def best_val(run) -> float:
    import json

    return json.loads((run / "run.json").read_text())["best_val_loss"]


@pytest.mark.slow  # a learning proof: ~90 s; `make test` runs the slow tests after the rest
def test_a_distilled_student_beats_cross_entropy_alone(tmp_path, shared_data):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((shared_data / "tinystories_sample.txt").read_text()[:200_000])
    teacher = run_cli(
        "train", "--data", str(corpus), "--preset", "tiny", "--output-dir", str(tmp_path),
        "--name", "teacher", "--max-steps", "200", "--batch-size", "16", "--seq-len", "64",
        "--lr", "3e-3", "--set", "tokenizer.vocab_size=512", "--set", "model.n_layers=2",
        "--set", "train.warmup_steps=20", "--set", "train.eval_every=100",
        "--set", "train.precision=fp32",
    )
    assert teacher.returncode == 0, teacher.stderr
    runs = {}
    for alpha in ("0.9", "0.0"):  # alpha 0: the same student on cross-entropy alone
        out = tmp_path / f"student-{alpha}"
        proc = run_cli("train", "distill", "--teacher", str(tmp_path / "teacher"), "--student",
                       "tiny", "--dataset", str(corpus), "--output", str(out), "--alpha", alpha,
                       *STUDENT)
        assert proc.returncode == 0, proc.stderr
        runs[alpha] = best_val(out)  # the student's own cross-entropy on the same val split
    assert runs["0.9"] < runs["0.0"] - 0.05, runs
    assert best_val(tmp_path / "teacher") < runs["0.9"]


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path, shared_data):
    for name, text in (("teacher", "the cat sat"), ("student", "a dog ran off")):
        tokenizer = make_tokenizer([text] * 3)
        make_family_model("llama", tokenizer).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((shared_data / "tinystories_sample.txt").read_text()[:20_000])
    out = tmp_path / "run"
    proc = run_cli("train", "distill", "--teacher", str(tmp_path / "teacher"), "--student",
                   str(tmp_path / "student"), "--dataset", str(corpus), "--output", str(out),
                   "--max-steps", "2", "--seq-len", "64")
    assert proc.returncode == 2, proc.stderr
    assert "do not share a tokenizer" in proc.stderr
    assert not out.exists()


def test_a_lora_student_on_instruction_data(tmp_path, shared_data):
    """The student may keep its weights and learn LoRA adapters; instruction data work too
    (targets on the replies only)."""
    import json

    from sft_tasks import CHAT_SPECIALS, split_task, task_texts

    tokenizer = make_tokenizer(task_texts(), *CHAT_SPECIALS)
    for name, seed in (("teacher", 1), ("student", 2)):
        make_family_model("llama", tokenizer, seed=seed).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in split_task(100, 0)[0]))
    out = tmp_path / "lora-kd"
    proc = run_cli("train", "distill", "--teacher", str(tmp_path / "teacher"), "--student",
                   str(tmp_path / "student"), "--dataset", str(data), "--output", str(out),
                   "--method", "lora", "--max-steps", "4", "--seq-len", "64", "--set",
                   "data.chat_template=chatml", "--set", "train.log_every=1")
    assert proc.returncode == 0, proc.stderr
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("kd_loss" in r and "ce_loss" in r for r in logged if "loss" in r)
    assert (out / "final" / "adapter_model.safetensors").is_file()
