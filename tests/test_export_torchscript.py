"""`largeforge export --format torchscript`: `torch.jit.load` gives a module whose logits are
the (merged) model's at any batch and length, not only the tracing example's."""

from __future__ import annotations

import json

import pytest
import torch

from largeforge.errors import LargeForgeError
from test_export_hf import build_adapter, build_llama, merged_reference


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("export-ts")
    llama = build_llama(root)
    return {"llama": llama, "adapter": build_adapter(llama, root)}


def test_lora_adapter_traces_to_module_with_merged_logits(models, tmp_path):
    from largeforge.cli.main import main

    out = tmp_path / "ts"
    # The CLI's own entry point, in this process (the other formats test it as a subprocess).
    assert main(["export", str(models["adapter"]), "--format", "torchscript",
                 "--output", str(out)]) == 0
    info = json.loads((out / "export_info.json").read_text())
    assert info["merged_adapter"] and info["file"] == "model.pt"
    assert (out / "tokenizer.json").is_file()
    module = torch.jit.load(str(out / "model.pt"))
    reference = merged_reference(models["adapter"], models["llama"])
    vocab = reference.config.vocab_size
    for shape in [(1, 1), (3, 13), (2, 40)]:  # traced at (2, 8)
        ids = torch.randint(0, vocab, shape)
        with torch.no_grad():
            got, want = module(ids), reference(ids).logits
        assert got.shape == (*shape, vocab)
        assert (got - want).abs().max() < 1e-5, shape


def test_torchscript_in_bfloat16_and_bad_dtype(models, tmp_path):
    from largeforge.export.torchscript import export_torchscript

    with pytest.raises(LargeForgeError, match="float32, float16, bfloat16"):
        export_torchscript(models["llama"], tmp_path / "bad", dtype="q8_0")
    assert not (tmp_path / "bad").exists()
    out = export_torchscript(models["llama"], tmp_path / "bf16", dtype="bfloat16")
    module = torch.jit.load(str(out / "model.pt"))
    ids = torch.randint(0, 300, (2, 5))
    with torch.no_grad():
        got = module(ids)
    assert got.dtype == torch.bfloat16 and got.shape[:2] == (2, 5)
