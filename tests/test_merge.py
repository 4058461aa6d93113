"""`largeforge merge`: base + LoRA adapter (PEFT's format) -> one HF directory, same logits."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_cli
from largeforge.models import ModelConfig, build_model
from largeforge.tokenizer import train_tokenizer

TEXT = ["The quick brown fox jumps over the lazy dog."] * 20


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    tok = train_tokenizer(TEXT, 280, root / "tok")
    torch.manual_seed(0)
    base = build_model(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                                   vocab_size=len(tok), max_seq_len=64))
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # B starts at zero; make the adapter do something
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    lora.save_pretrained(root / "adapter")
    return root


def test_merged_model_has_base_plus_adapter_logits(base_and_adapter, tmp_path):
    root = base_and_adapter
    out = tmp_path / "merged"
    proc = run_cli("merge", "--base", str(root / "base"), "--adapter", str(root / "adapter"),
                   "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(root / "base").eval()
    with_adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(root / "base"), root / "adapter").eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 16))
    with torch.no_grad():
        want, got, plain = with_adapter(ids).logits, merged(ids).logits, base(ids).logits
    assert (want - got).abs().max() < 1e-4
    assert (plain - got).abs().max() > 1e-2  # the adapter changed the model
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(
        root / "base").get_vocab()


def test_base_defaults_to_the_one_the_adapter_names(base_and_adapter, tmp_path):
    import shutil

    root = base_and_adapter
    for name, base in (("named", str(root / "base")), ("unnamed", None)):
        adapter = tmp_path / name
        shutil.copytree(root / "adapter", adapter)
        config = json.loads((adapter / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base
        (adapter / "adapter_config.json").write_text(json.dumps(config))
    proc = run_cli("merge", "--adapter", str(tmp_path / "named"), "--output", str(tmp_path / "m"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m" / "model.safetensors").is_file()
    proc = run_cli("merge", "--adapter", str(tmp_path / "unnamed"), "--output",
                   str(tmp_path / "n"))
    assert proc.returncode == 2 and "--base" in proc.stderr
    assert not (tmp_path / "n").exists()


def test_bad_inputs_exit_2_and_write_nothing(base_and_adapter, tmp_path):
    root = base_and_adapter
    proc = run_cli("merge", "--base", str(root / "base"), "--adapter", str(root / "base"),
                   "--output", str(tmp_path / "a"))
    assert proc.returncode == 2 and "not a PEFT adapter" in proc.stderr
    other = build_model(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=280,
                                    max_seq_len=64))
    other.save_pretrained(tmp_path / "other")
    proc = run_cli("merge", "--base", str(tmp_path / "other"), "--adapter",
                   str(root / "adapter"), "--output", str(tmp_path / "b"))
    assert proc.returncode == 2 and "does not fit" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
