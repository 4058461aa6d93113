"""`train` on instruction data: chat template rendering, assistant-only loss, packing, the
template saved with the model, over-long samples counted, and exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from largeforge.chat_templates import get_template
from largeforge.config import load_recipe
from largeforge.data.instruct_data import (
    conversation_texts,
    load_conversations,
    prepare_instruction_data,
)
from largeforge.errors import LargeForgeError
from largeforge.tokenizer import train_tokenizer
from largeforge.training.loop import train


def recipe(data: Path, out: Path, name: str, **data_options: object) -> dict:
    return {
        "model": {"preset": "tiny", "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                  "hidden_dim": 128, "max_seq_len": 128},
        "tokenizer": {"vocab_size": 400},
        "data": {"train": [str(data)], "seq_len": 128, "val_percent": 10, **data_options},
        "train": {"batch_size": 4, "max_steps": 12, "lr": 3e-3, "warmup_steps": 2,
                  "eval_every": 4, "eval_batches": 2, "log_every": 1, "save_every": 4,
                  "keep_checkpoints": 5, "precision": "fp32", "threads": 1},
        "output": {"dir": str(out), "name": name},
    }


@pytest.fixture
def alpaca(tmp_path, shared_data) -> Path:
    records = json.loads((shared_data / "alpaca_sample.json").read_text(encoding="utf-8"))[:240]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def metrics(run: Path) -> list[tuple[int, str, float]]:
    out = []
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        out += [(record["step"], k, record[k]) for k in ("loss", "val_loss", "grad_norm")
                if k in record]
    return out


@pytest.mark.parametrize("packing", [False, True])
def test_instruction_training_saves_the_template(alpaca, tmp_path, packing):
    result = train(load_recipe(recipe(alpaca, tmp_path / "runs", "sft", packing=packing),
                               environ={}))
    assert result.steps == 12 and result.best_val_loss is not None
    losses = [loss for _, key, loss in metrics(result.run_dir) if key == "loss"]
    assert losses[-1] < losses[0]
    saved = AutoTokenizer.from_pretrained(result.final_dir)
    assert saved.chat_template == get_template("chatml")
    assert (result.final_dir / "chat_template.jinja").is_file()
    prompt = saved.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                       add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_overlong_samples_are_cut_or_dropped_and_counted(alpaca, tmp_path):
    fmt, conversations = load_conversations([str(alpaca)])
    tok = train_tokenizer(conversation_texts(conversations), 400, tmp_path / "tok")
    counts = {}
    for mode in ("truncate", "drop"):
        corpus = prepare_instruction_data(fmt, conversations, tok, seq_len=80, overlong=mode)
        samples = corpus.train + corpus.val
        assert corpus.overlong > 0 and all(len(ids) <= 80 for ids, _ in samples)
        assert corpus.dropped == (corpus.overlong if mode == "drop" else 0)
        assert len(samples) + corpus.dropped + corpus.empty == corpus.records == 240
        assert f"{corpus.overlong:,} longer than seq_len ({corpus.dropped:,} dropped)" in (
            corpus.summary())
        counts[mode] = len(samples)
    assert counts["drop"] < counts["truncate"]


def test_preference_data_is_refused(tmp_path, shared_data):
    r = recipe(shared_data / "hh_rlhf_sample.jsonl", tmp_path / "runs", "pref")
    with pytest.raises(LargeForgeError, match="DPO"):
        train(load_recipe(r, environ={}))
    assert not (tmp_path / "runs" / "pref").exists()


def test_exact_resume_with_instruction_data(alpaca, tmp_path):
    whole = train(load_recipe(recipe(alpaca, tmp_path / "runs", "whole", packing=True),
                              environ={}))
    # The state a crash after the step-4 checkpoint leaves: later checkpoints never written.
    cut = train(load_recipe(recipe(alpaca, tmp_path / "runs", "cut", packing=True), environ={}))
    checkpoints = cut.run_dir / "checkpoints"
    for later in ("step-8", "step-12"):
        shutil.rmtree(checkpoints / later)
    (checkpoints / "latest").write_text("step-4\n")
    resumed = train(load_recipe(recipe(alpaca, tmp_path / "runs", "cut", packing=True),
                                environ={}), resume="latest")
    assert resumed.steps == 12
    assert metrics(resumed.run_dir) == metrics(whole.run_dir)


def test_data_kind_decides_without_reading_text_corpora_whole(tmp_path, alpaca):
    import datasets

    from largeforge.data.instruct_data import data_kind

    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("one document\n")
    (corpus / "sub" / "b.md").write_text("another\n")
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50)))
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "yo"}]}) + "\n")
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"text": "a saved document"}]).save_to_disk(str(saved))
    assert data_kind([str(corpus)]) == "pretrain"
    assert data_kind([str(texts), str(corpus / "a.txt")]) == "pretrain"
    with pytest.raises(LargeForgeError, match="mixed formats"):  # texts + chats
        data_kind([str(tmp_path / "*.jsonl")])
    assert data_kind([str(chats)]) == "instruction"
    assert data_kind([str(alpaca)]) == "instruction"
    assert data_kind([str(saved)]) == "pretrain"
