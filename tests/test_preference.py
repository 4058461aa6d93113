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
    SimPOObjective,
    dpo_loss,
    orpo_odds_ratio_loss,
    sequence_logps,
    simpo_loss,
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


def test_simpo_by_hand_from_the_paper():
    # Meng et al. 2024, eq. 6: -log s(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma),
    # here with mean log-probabilities -1 and -2, beta 2 and gamma 0.5: -log s(2 - 0.5)
    loss = simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)))
    # The margin gamma raises the bar: equal rewards cost -log s(-gamma), more than log 2.
    assert simpo_loss(t(-1.0), t(-1.0), beta=2.0, gamma=0.5).item() == pytest.approx(
        math.log1p(math.exp(0.5)))
    assert simpo_loss(t(-1.0), t(-1.0), beta=2.0, gamma=0.0).item() == pytest.approx(math.log(2))


def test_simpo_objective_normalises_each_completion_by_its_length(tokenizer):
    """The objective on a real batch: log-likelihoods divided by each side's own target count
    (chosen and rejected differ in length here), with no reference model."""
    from largeforge.data.formats import normalise_record

    model = make_family_model("llama", tokenizer)
    pairs = [{"prompt": "red cat", "chosen": "cat red", "rejected": "red cat red cat blue"},
             {"prompt": "sun moon star", "chosen": "star moon sun", "rejected": "sun"}]
    corpus = prepare_preference_data([normalise_record(p, "preference") for p in pairs],
                                     tokenizer, seq_len=64, chat_template="chatml",
                                     val_percent=0.0)
    batch = collate_pairs(corpus.train, tokenizer.pad_token_id)
    loss, metrics = SimPOObjective(beta=2.5, gamma=0.8)(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
    total, count = sequence_logps(logits, batch["labels"])
    assert count[0] != count[2]  # the sides of the first pair have different lengths
    mean = total / count
    expected = -torch.nn.functional.logsigmoid(2.5 * (mean[:2] - mean[2:]) - 0.8).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["rewards_chosen"].item() == pytest.approx(2.5 * mean[:2].mean().item(),
                                                             rel=1e-5)


def test_simpo_trains_through_the_one_loop(tokenizer, tmp_path):
    """SimPO is a row of the objective table: the same loop, data kind and logs as DPO."""
    from largeforge import train
    from largeforge.config import load_recipe

    base = tmp_path / "base"
    make_family_model("llama", tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in reverse_vs_copy(64, seed=1)))
    recipe = load_recipe({
        "model": {"from_pretrained": str(base)},
        "data": {"train": [str(data)], "seq_len": 64, "chat_template": "chatml"},
        "train": {"objective": "simpo", "max_steps": 30, "batch_size": 8, "lr": 3e-3,
                  "warmup_steps": 0, "log_every": 5, "eval_every": 15, "precision": "fp32"},
        "preference": {"beta": 2.0, "simpo_gamma": 0.5},
        "output": {"dir": str(tmp_path / "runs"), "name": "simpo"},
    }, environ={})
    result = train(recipe)
    logged = [json.loads(line) for line in
              (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r]
    assert {"rewards_chosen", "reward_margin", "preference_accuracy"} <= set(logged[0])
    assert losses[-1] < losses[0] and logged[-2]["reward_margin"] > 0, logged


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
    (log pi - log ref) of chosen above rejected; for ORPO and SimPO, the mean log-probability."""
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


# SimPO's rewards are mean log-probabilities (small differences), so its beta is larger, as in the
# paper (beta 2-2.5, gamma 0.5-1.5).
SIMPO_ARGS = ["--beta", "2.5", "--set", "preference.simpo_gamma=1.0"]


@pytest.mark.slow  # a learning proof: ~2 min; `make test` runs the slow tests after the rest
@pytest.mark.parametrize("objective, method", [("dpo", "full"), ("dpo", "lora"),
                                               ("orpo", "full"), ("simpo", "full")])
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
        "--set", "lora.r=16", *(SIMPO_ARGS if objective == "simpo" else []),
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
