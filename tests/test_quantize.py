"""`largeforge quantize`: int8 and int4 (bitsandbytes) directories that transformers and
`largeforge generate` load back, smaller on disk, with perplexity close to the original's.

The model is a tiny Llama trained for a few seconds on TinyStories text, so its perplexity on
held-out text (about 25) is far below chance (the vocabulary, 330): quantisation errors show in
it. Stated tolerance: int8 within 2%, int4 within 5% (measured: +0.0% and +1.2%).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import SHARED_DATA, run_cli
from largeforge.errors import LargeForgeError
from largeforge.models import ModelConfig, build_model
from test_export_hf import build_adapter
from tiny_models import make_tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not (SHARED_DATA / "tinystories_sample.txt").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    root = tmp_path_factory.mktemp("quantize")
    text = (SHARED_DATA / "tinystories_sample.txt").read_text(encoding="utf-8")
    train, held_out = text[:40_000], text[40_000:46_000]
    tok = make_tokenizer(train.splitlines()[:200])
    ids = torch.tensor(tok(train, add_special_tokens=False)["input_ids"])
    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                                    vocab_size=len(tok), max_seq_len=128))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, more only contend
    try:
        for _ in range(120):
            starts = torch.randint(0, len(ids) - 65, (16,))
            batch = torch.stack([ids[s:s + 65] for s in starts])
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "held_out.txt").write_text(held_out, encoding="utf-8")
    return {"model": root / "model", "text": root / "held_out.txt", "root": root}


def _generate(directory: Path) -> str:
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tok = AutoTokenizer.from_pretrained(directory)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:])


def test_int8_cli_reports_perplexity_and_loads_back(trained, tmp_path):
    out = tmp_path / "int8"
    proc = run_cli("quantize", str(trained["model"]), "--method", "int8", "--output", str(out),
                   "--eval-text", str(trained["text"]))
    assert proc.returncode == 0, proc.stderr
    assert "perplexity" in proc.stdout and "before" in proc.stdout and "after (int8)" in proc.stdout
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["method"] == "int8" and report["library"].startswith("bitsandbytes")
    assert report["perplexity_before"] < 60  # trained: far below chance (330)
    assert abs(report["perplexity_change"]) < 0.02
    assert report["eval_tokens"] > 1000
    assert report["size_after"] < 0.6 * report["size_before"]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["load_in_8bit"] is True
    assert _generate(out).strip()


def test_int4_of_lora_adapter_loads_back_and_generates(trained, tmp_path):
    from largeforge.export.quantize import quantize

    adapter = build_adapter(trained["model"], trained["root"], scale=0.02)
    out = tmp_path / "int4"
    report = quantize(adapter, out, method="int4", eval_text=trained["text"])
    assert report.perplexity_before is not None and report.perplexity_before < 60
    assert abs(report.perplexity_change or 0.0) < 0.05
    assert report.size_after < 0.5 * report.size_before
    saved = json.loads((out / "quantize_report.json").read_text())
    assert saved["perplexity_after"] == pytest.approx(report.perplexity_after)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert not list(tmp_path.glob(".int4.*"))  # the merged scratch copy is gone
    from largeforge.inference.generate import generate, load_for_inference

    model, _ = load_for_inference(out)  # what `largeforge generate` and `chat` load
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert generate(out, "Once upon a time", max_new_tokens=12, temperature=0).strip()


def test_awq_gptq_and_bad_inputs_exit_2_and_write_nothing(trained, tmp_path, capsys):
    from largeforge.cli.main import main

    out = tmp_path / "out"
    model = str(trained["model"])
    proc = run_cli("quantize", model, "--method", "awq", "--output", str(out))
    assert proc.returncode == 2 and "CUDA" in proc.stderr and "autoawq" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    cases = [
        (["--method", "gptq"], "gptqmodel"),
        (["--method", "int3"], "expected one of: int8, int4, awq, gptq"),
        (["--method", "int8", "--eval-text", str(tmp_path / "none.txt")], "no such file"),
        (["--method", "int8", "--eval-text", str(binary)], "not UTF-8"),
        (["--method", "int8", "--eval-text", str(empty)], "is empty"),
    ]
    for flags, message in cases:
        code = main(["quantize", model, *flags, "--output", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (flags, err)
    assert not out.exists()
    with pytest.raises(LargeForgeError, match="not empty"):
        from largeforge.export.quantize import quantize

        quantize(model, tmp_path, method="int8")  # holds binary.txt and empty.txt
