"""`largeforge export --format hf`: transformers loads what we write, with our logits.

The helpers at the top build the tiny models every export test uses (a Llama with a chat
template, a LoRA adapter on it, a Qwen2); the ONNX and TorchScript tests import them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_cli
from largeforge.errors import LargeForgeError
from tiny_models import make_family_model, make_model, make_tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Once upon a time there was a cat."]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_llama(root: Path) -> Path:
    """A random tiny Llama with a byte-level BPE tokenizer and a chat template."""
    tok = make_tokenizer(TEXTS)
    tok.chat_template = CHATML
    model = make_model(len(tok), max_seq_len=128)
    model.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    return root / "llama"


def build_adapter(base_dir: Path, root: Path, scale: float = 0.2) -> Path:
    """A LoRA adapter on `base_dir` whose B matrices are not zero, so it changes the logits.
    Saved without a tokenizer: exports must take the base's."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, scale)
    lora.save_pretrained(root / "adapter")
    return root / "adapter"


def build_qwen2(root: Path) -> Path:
    tok = make_tokenizer(TEXTS)
    model = make_family_model("qwen2", tok).eval()
    model.save_pretrained(root / "qwen2")
    tok.save_pretrained(root / "qwen2")
    return root / "qwen2"


def merged_reference(adapter_dir: Path, base_dir: Path) -> torch.nn.Module:
    """Base + adapter through peft itself, the model an export of the adapter must equal."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-hf")
    llama = build_llama(root)
    return {"llama": llama, "adapter": build_adapter(llama, root), "qwen2": build_qwen2(root)}


def test_lora_adapter_exports_as_sharded_hf_dir_with_merged_logits(models, tmp_path):
    out = tmp_path / "hf"
    proc = run_cli("export", str(models["adapter"]), "--format", "hf", "--output", str(out),
                   "--max-shard-size", "60KB")
    assert proc.returncode == 0, proc.stderr
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert not (out / "adapter_config.json").exists()
    assert (out / "generation_config.json").is_file()

    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    want = merged_reference(models["adapter"], models["llama"])
    base = AutoModelForCausalLM.from_pretrained(models["llama"]).eval()
    ids = torch.randint(0, exported.config.vocab_size, (3, 17))
    got = logits(exported, ids)
    assert (got - logits(want, ids)).abs().max() < 1e-4
    assert (got - logits(base, ids)).abs().max() > 1e-2  # the adapter was merged in

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(models["llama"]).get_vocab()
    assert tok.chat_template == CHATML
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHATML
    assert (out / "chat_template.jinja").read_text() == CHATML
    assert not list(tmp_path.glob(".hf.*"))  # the staging directory is gone


def test_qwen2_exports_in_float16_and_overwrites_only_when_asked(models, tmp_path):
    from largeforge.export.hf import export_hf

    out = tmp_path / "qwen2-fp16"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(LargeForgeError, match="not empty"):
        export_hf(models["qwen2"], out, dtype="float16")
    assert (out / "old.txt").read_text() == "keep me"

    export_hf(models["qwen2"], out, dtype="float16", overwrite=True)
    assert not (out / "old.txt").exists()
    exported = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    assert exported.config.model_type == "qwen2"
    assert next(exported.parameters()).dtype == torch.float16
    ours = AutoModelForCausalLM.from_pretrained(models["qwen2"]).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 9))
    # Our weights rounded to fp16 are exactly what was written: compare in fp32.
    want = logits(ours.half().float(), ids)
    assert (logits(exported.float(), ids) - want).abs().max() < 1e-4
    assert (out / "generation_config.json").is_file()
    assert AutoTokenizer.from_pretrained(out).eos_token == "</s>"


def test_bad_export_flags_exit_2_and_write_nothing(models, tmp_path, capsys):
    from largeforge.cli.main import main

    out = tmp_path / "out"
    proc = run_cli("export", str(models["llama"]), "--format", "safetensors", "--output", str(out))
    assert proc.returncode == 2, proc.stderr
    assert "expected one of: hf, gguf, ollama, onnx, torchscript" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    cases = [  # the same entry point, in this process (a subprocess each costs seconds)
        (["--format", "hf", "--dtype", "q4_0"], "float32, float16, bfloat16"),
        (["--format", "hf", "--opset", "18"], "--opset applies to --format onnx only"),
        (["--format", "torchscript", "--max-shard-size", "1GB"], "applies to --format hf"),
        (["--format", "hf", "--max-shard-size", "big"], "write it like 5GB"),
    ]
    for flags, message in cases:
        code = main(["export", str(models["llama"]), *flags, "--output", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (flags, err)
    code = main(["export", str(tmp_path / "missing"), "--format", "hf", "--output", str(out)])
    assert code == 2 and "not found" in capsys.readouterr().err
    assert not out.exists()


def test_bad_export_inputs_raise_and_write_nothing(models, tmp_path):
    import shutil

    from largeforge.export.hf import export_hf

    out = tmp_path / "out"
    with pytest.raises(LargeForgeError, match="5GB, 500MB"):
        export_hf(models["llama"], out, max_shard_size="lots")
    with pytest.raises(LargeForgeError, match="float32, float16, bfloat16"):
        export_hf(models["llama"], out, dtype="f16")
    with pytest.raises(LargeForgeError, match="would replace the model"):
        export_hf(models["llama"], models["llama"].parent, overwrite=True)
    quantized = tmp_path / "quantized"
    shutil.copytree(models["llama"], quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(LargeForgeError, match="quantised model"):
        export_hf(quantized, out)
    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(models["llama"]).save_pretrained(bare)
    with pytest.raises(LargeForgeError, match="has no tokenizer"):
        export_hf(bare, out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "quantized"]
