"""`largeforge export --format onnx`: onnxruntime runs the graph with our logits (1e-4), with
the KV cache (a prompt, then a decoding step on the returned cache) and without it, at a batch
and length other than the export's example (2 x 3, past 5)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import run_cli
from largeforge.errors import LargeForgeError
from test_export_hf import build_adapter, build_llama, build_qwen2, merged_reference

TOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("export-onnx")
    llama = build_llama(root)
    return {"llama": llama, "adapter": build_adapter(llama, root), "qwen2": build_qwen2(root)}


def _session(directory) -> ort.InferenceSession:
    return ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])


def test_lora_adapter_with_kv_cache_runs_prompt_and_decode_step(models, tmp_path):
    out = tmp_path / "onnx"
    proc = run_cli("export", str(models["adapter"]), "--format", "onnx", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    info = json.loads((out / "export_info.json").read_text())
    assert info["kv_cache"] and info["merged_adapter"] and info["dtype"] == "float32"
    assert info["opset"] >= 18 and info["external_data"] is None
    assert not (out / "model.onnx.data").exists()
    layers = info["num_layers"]
    names = [i["name"] for i in info["inputs"]]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert [o["name"] for o in info["outputs"]][-1] == f"present.{layers - 1}.value"

    session = _session(out)
    assert [i.name for i in session.get_inputs()] == names
    key = next(i for i in info["inputs"] if i["name"] == "past_key_values.0.key")
    kv_heads, head_dim = key["shape"][1], key["shape"][3]
    reference = merged_reference(models["adapter"], models["llama"])
    batch, length = 3, 7
    ids = torch.randint(0, reference.config.vocab_size, (batch, length))
    feed = {
        "input_ids": ids.numpy(),
        "attention_mask": np.ones((batch, length), np.int64),
        "position_ids": np.tile(np.arange(length), (batch, 1)),
    }
    for name in names[3:]:
        feed[name] = np.zeros((batch, kv_heads, 0, head_dim), np.float32)
    prompt = session.run(None, feed)
    with torch.no_grad():
        want = reference(ids).logits.numpy()
    assert np.abs(prompt[0] - want).max() < TOL
    assert prompt[1].shape == (batch, kv_heads, length, head_dim)

    step = torch.randint(0, reference.config.vocab_size, (batch, 1))
    feed = {
        "input_ids": step.numpy(),
        "attention_mask": np.ones((batch, length + 1), np.int64),
        "position_ids": np.full((batch, 1), length, np.int64),
    }
    feed.update(zip(names[3:], prompt[1:], strict=True))
    decoded = session.run(None, feed)
    with torch.no_grad():
        want_step = reference(torch.cat([ids, step], dim=1)).logits[:, -1:].numpy()
    assert np.abs(decoded[0] - want_step).max() < TOL
    assert decoded[1].shape == (batch, kv_heads, length + 1, head_dim)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def test_qwen2_without_kv_cache_gives_logits(models, tmp_path):
    from largeforge.export.onnx_export import export_onnx

    out = export_onnx(models["qwen2"], tmp_path / "qwen2", kv_cache=False)
    info = json.loads((out / "export_info.json").read_text())
    assert [o["name"] for o in info["outputs"]] == ["logits"]
    assert info["model_type"] == "qwen2" and not info["merged_adapter"]
    session = _session(out)
    assert [i.name for i in session.get_inputs()] == [
        "input_ids", "attention_mask", "position_ids"]
    ours = AutoModelForCausalLM.from_pretrained(models["qwen2"]).eval()
    batch, length = 4, 11
    ids = torch.randint(0, ours.config.vocab_size, (batch, length))
    (got,) = session.run(None, {
        "input_ids": ids.numpy(),
        "attention_mask": np.ones((batch, length), np.int64),
        "position_ids": np.tile(np.arange(length), (batch, 1)),
    })
    with torch.no_grad():
        want = ours(ids).logits.numpy()
    assert got.shape == want.shape and np.abs(got - want).max() < TOL


def test_bad_onnx_options_raise_and_write_nothing(models, tmp_path, capsys):
    from largeforge.cli.main import main
    from largeforge.export.onnx_export import export_onnx

    out = tmp_path / "out"
    with pytest.raises(LargeForgeError, match="opset 9 is not supported"):
        export_onnx(models["llama"], out, opset=9)
    with pytest.raises(LargeForgeError, match="float32, float16"):
        export_onnx(models["llama"], out, dtype="bfloat16")
    code = main(["export", str(models["llama"]), "--format", "onnx", "--opset", "99",
                 "--output", str(out)])
    assert code == 2 and "opset 99 is not supported" in capsys.readouterr().err
    code = main(["export", str(models["llama"]), "--format", "hf", "--no-kv-cache",
                 "--output", str(out)])
    assert code == 2 and "--no-kv-cache applies to --format onnx" in capsys.readouterr().err
    assert not out.exists()
