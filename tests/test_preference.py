"""Preference optimisation: the DPO and ORPO losses against values computed by hand from the
papers' formulas, and training that really moves held-out preferences."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import run_cli
from largeforge.data.preference_data import collate_pairs, prepare_preference_data
from largeforge.training.preference import (
    dpo_loss,
    orpo_odds_ratio_loss,
    sequence_logps,
)
from sft_tasks import CHAT_SPECIALS, split_task, task_texts
from tiny_models import make_family_model, make_tokenizer


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_sequence_logps_sum_the_targets_only():
    # Two positions predict tokens 1 and 0; labels are aligned with the inputs (shifted inside).
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [1 / 3] * 3]]))
    labels = torch.tensor([[-100, 1, 2]])
    total, count = sequence_logps(logits, labels)
    assert count.item() == 2
    assert total.item() == pytest.approx(math.log(0.25) + math.log(0.3), abs=1e-6)


def test_dpo_sigmoid_smoothed_and_ipo_by_hand():
    # h = (log pi_w - log ref_w) - (log pi_l - log ref_l) = (-1 + 1.5) - (-2 + 1.5) = 1
    args = (t(-1.0), t(-2.0), t(-1.5), t(-1.5))
    losses, chosen, rejected = dpo_loss(*args, beta=0.1)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.1)))  # -log s(0.1)
    assert chosen.item() == pytest.approx(0.05) and rejected.item() == pytest.approx(-0.05)
    smoothed, _, _ = dpo_loss(*args, beta=0.1, label_smoothing=0.2)
    assert smoothed.item() == pytest.approx(
        0.8 * math.log1p(math.exp(-0.1)) + 0.2 * math.log1p(math.exp(0.1)))
    ipo, _, _ = dpo_loss(*args, beta=0.1, loss_type="ipo")
    assert ipo.item() == pytest.approx((1 - 1 / 0.2) ** 2)  # (h - 1/(2 beta))^2 = 16
    # A pair the policy already prefers more than the reference costs less than one it doesn't.
    better, _, _ = dpo_loss(t(-0.5), t(-3.0), t(-1.5), t(-1.5), beta=0.1)
    assert better.item() < losses.item()


def test_orpo_odds_ratio_by_hand():
    # P(y_w) = 0.5 (odds 1), P(y_l) = 0.25 (odds 1/3): log odds ratio = log 3
    loss = orpo_odds_ratio_loss(t(math.log(0.5)), t(math.log(0.25)))
    assert loss.item() == pytest.approx(-math.log(1 / (1 + 1 / 3)))  # -log s(log 3) = log 4/3


def test_dpo_against_trl(tmp_path):
    """TRL's DPOTrainer and ours on the same batch (its own tokenisation and completion mask),
    the policy moved away from the reference: the same sigmoid loss. (IPO is not compared: TRL
    averages it over completion tokens, we follow the paper's sequence log-likelihoods.)"""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from largeforge.training.preference import DPOObjective

    tokenizer = make_tokenizer(task_texts(), *CHAT_SPECIALS)
    make_family_model("llama", tokenizer).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    data = Dataset.from_list([
        {"prompt": "red cat blue", "chosen": " blue cat red", "rejected": " red cat blue"},
        {"prompt": "sun moon", "chosen": " moon sun", "rejected": " sun moon star"},
    ])
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tmp_path / "m"), train_dataset=data,
        processing_class=tokenizer,
        args=DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2,
                       max_steps=1, report_to="none", use_cpu=True, beta=0.1),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    torch.manual_seed(0)
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
        theirs = trainer.compute_loss(trainer.model, batch)
        ours, _ = DPOObjective(beta=0.1, reference=trainer.ref_model)(trainer.model, {
            "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100),
        })
    assert abs(theirs.item() - math.log(2)) > 1e-3  # the policy really differs
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)


def test_orpo_against_trl():
    """TRL's ORPO odds-ratio term (a trainer method; its DPO loss sits inside the trainer's
    compute_loss and is checked by hand above): losses = beta * log s(log odds)."""
    from types import SimpleNamespace

    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    chosen = torch.tensor([-0.7, -1.2, -0.1, -2.5])
    rejected = torch.tensor([-0.9, -0.4, -3.0, -2.5])
    trainer = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    theirs, *_ = orpo.ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)
    ours = orpo_odds_ratio_loss(chosen, rejected)
    assert torch.allclose(-0.1 * ours, theirs, atol=1e-6)  # ours is the positive loss


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(task_texts(), *CHAT_SPECIALS)


def reverse_vs_copy(n: int, seed: int) -> list[dict]:
    """Chosen: the words reversed; rejected: the words repeated as given."""
    records, _ = split_task(n, 0, seed=seed)
    return [{"prompt": r["messages"][0]["content"], "chosen": r["messages"][1]["content"],
             "rejected": r["messages"][0]["content"]} for r in records]


def held_out_accuracy(policy, reference, pairs, tokenizer, objective: str) -> float:
    """Share of pairs whose chosen side the model prefers: DPO's implicit reward
    (log pi - log ref) of chosen above rejected; for ORPO, the mean log-probability."""
    from largeforge.data.formats import normalise_record

    records = [normalise_record(p, "preference") for p in pairs]
    corpus = prepare_preference_data(records, tokenizer, seq_len=64, chat_template="chatml",
                                     val_percent=0.0)
    batch = collate_pairs(corpus.train, tokenizer.pad_token_id)
    with torch.no_grad():
        def logps(model):
            out = model.eval()(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
            return sequence_logps(out, batch["labels"])
        total, count = logps(policy)
        if objective == "dpo":
            score = total - logps(reference)[0]
        else:
            score = total / count
    n = score.numel() // 2
    # float64: 54 wins of 60 must read as 0.9, not float32's 0.89999998
    wins = (score[:n] > score[n:]).double() + 0.5 * (score[:n] == score[n:]).double()
    return wins.mean().item()


@pytest.mark.slow  # a learning proof: ~2 min; `make test` runs the slow tests after the rest
@pytest.mark.parametrize("objective, method", [("dpo", "full"), ("dpo", "lora"),
                                               ("orpo", "full")])
def test_preference_training_moves_held_out_preferences(objective, method, tokenizer, tmp_path):
    base = tmp_path / "base"
    make_family_model("llama", tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    train = tmp_path / "prefs.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in reverse_vs_copy(400, seed=1)))
    held_out = reverse_vs_copy(60, seed=2)

    reference = AutoModelForCausalLM.from_pretrained(base)
    before = held_out_accuracy(reference, reference, held_out, tokenizer, objective)
    out = tmp_path / "run"
    proc = run_cli(
        "train", objective, "--model", str(base), "--dataset", str(train), "--output", str(out),
        "--method", method, "--chat-template", "chatml", "--seq-len", "64", "--precision",
        "fp32", "--max-steps", "500" if method == "lora" else "700", "--batch-size", "8",
        "--lr", "3e-3" if method == "lora" else "1e-3",
        "--set", "train.log_every=25", "--set", "train.eval_every=100", "--set", "lora.dropout=0",
        "--set", "lora.r=16",
    )
    assert proc.returncode == 0, proc.stderr
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"rewards_chosen", "rewards_rejected", "reward_margin", "preference_accuracy"} <= set(
        logged[-2])
    from largeforge.models import load_model

    after = held_out_accuracy(load_model(out), reference, held_out, tokenizer, objective)
    if objective == "dpo":
        assert before == 0.5  # the policy is the reference: every reward is 0
    assert after >= 0.9, (before, after)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_runs_on_hh_rlhf(objective, tokenizer, tmp_path, shared_data: Path):
    base = tmp_path / "base"
    make_family_model("qwen2", tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = tmp_path / "hh"
    proc = run_cli(
        "train", objective, "--model", str(base), "--dataset",
        str(shared_data / "hh_rlhf_sample.jsonl"), "--output", str(out),
        "--chat-template", "chatml", "--seq-len", "256", "--max-steps", "3", "--batch-size", "2",
        "--set", "train.log_every=1",
    )
    assert proc.returncode == 0, proc.stderr
    assert "preference pairs" in proc.stdout
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text()
              .splitlines() if '"loss"' in line]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert (out / "final" / "adapter_model.safetensors").is_file()
