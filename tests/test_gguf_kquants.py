"""K-quants and llama.cpp's quantizer: `--dtype q4_k_m|q5_k_m|q6_k|q8_0|q4_0` goes through
`llama_model_quantize`, the file holds llama.cpp's K types, llama.cpp runs it, and the
perplexity ratio to F16 is printed and written beside the file.

The model is a random Llama whose rows are 256 wide, so the K types (blocks of 256) really
apply; narrower rows fall back to legacy types, as llama.cpp's own quantizer does.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
import transformers

import tiny_models
from conftest import run_cli
from largeforge.export.gguf_quantize import report_path

llama_cpp = pytest.importorskip("llama_cpp")

TEXT = ["the quick brown fox jumps over the lazy dog", "hello world, this is a tokenizer test"]
EVAL_TEXT = "The fox and the dog. " * 200


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kquant") / "model"
    tokenizer = tiny_models.make_tokenizer(TEXT)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tensor_types(path: Path) -> set[str]:
    return {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def file_type(path: Path) -> int:
    field = gguf.GGUFReader(str(path)).fields["general.file_type"]
    return int(field.parts[field.data[0]][0])


@pytest.mark.parametrize(("dtype", "expected_types", "ftype"), [
    ("q4_k_m", {"Q4_K", "Q6_K"}, "LLAMA_FTYPE_MOSTLY_Q4_K_M"),
    ("q5_k_m", {"Q5_K", "Q6_K"}, "LLAMA_FTYPE_MOSTLY_Q5_K_M"),
    ("q6_k", {"Q6_K"}, "LLAMA_FTYPE_MOSTLY_Q6_K"),
    ("q8_0", {"Q8_0"}, "LLAMA_FTYPE_MOSTLY_Q8_0"),
])
def test_llama_cpp_quantizes_and_reports_perplexity(model_dir, tmp_path, dtype, expected_types,
                                                    ftype):
    out = tmp_path / f"model.{dtype}.gguf"
    result = run_cli("export", str(model_dir), "--format", "gguf", "--dtype", dtype,
                     "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert expected_types <= tensor_types(out)
    assert file_type(out) == getattr(llama_cpp, ftype)
    report = json.loads(report_path(out).read_text())
    assert report["dtype"] == dtype and report["text"] == "builtin:python-docs"
    assert report["ratio"] == pytest.approx(report["perplexity"] / report["perplexity_f16"])
    assert 0.9 < report["ratio"] < 1.2 and report["tokens"] > 500
    assert f"ratio {report['ratio']:.4f}" in result.stdout
    assert "llama_model_quantize" not in result.stderr  # llama.cpp's log stays off the terminal
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [out.name, report_path(out).name])  # no staging files left

    llm = llama_cpp.Llama(str(out), n_ctx=64, n_threads=1, verbose=False)
    try:
        tokens = llm.tokenize(b"the quick brown", add_bos=False)
        llm.eval(tokens)
        assert llm.n_tokens == len(tokens)
    finally:
        llm.close()


def test_finer_types_lose_less_perplexity(model_dir, tmp_path):
    from largeforge.export.gguf import export_gguf

    ratios = {}
    for dtype in ("q4_0", "q6_k"):
        out = export_gguf(str(model_dir), tmp_path / f"{dtype}.gguf", dtype=dtype,
                          eval_text=EVAL_TEXT)
        report = json.loads(report_path(out).read_text())
        assert report["text"] == "--eval-text"
        ratios[dtype] = abs(report["ratio"] - 1)
    assert ratios["q6_k"] < ratios["q4_0"]


def test_ollama_export_takes_k_quants(model_dir, tmp_path):
    from largeforge.chat_templates import get_template
    from largeforge.export.ollama import export_ollama

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = get_template("chatml")
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "ollama"
    export_ollama(str(model_dir), out, dtype="q4_k_m")
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf",
                                                      "model.perplexity.json"]
    assert "Q4_K" in tensor_types(out / "model.gguf")
    export_ollama(str(model_dir), out, dtype="q6_k")  # a previous export is replaced
    assert json.loads((out / "model.perplexity.json").read_text())["dtype"] == "q6_k"
    export_ollama(str(model_dir), out, dtype="f16")  # no quantisation: no stale report
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]


def test_k_quants_without_llama_cpp_say_what_to_install(model_dir, tmp_path):
    blocker = tmp_path / "site" / "llama_cpp"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('llama_cpp is not installed')\n")
    out = tmp_path / "out.gguf"
    result = run_cli("export", str(model_dir), "--format", "gguf", "--dtype", "q4_k_m",
                     "--output", str(out), env={"PYTHONPATH": str(tmp_path / "site")})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pip install llama-cpp-python" in errors[0]
    assert "Traceback" not in result.stderr
    assert not out.exists() and not report_path(out).exists()


def test_eval_text_applies_to_gguf_and_ollama_only(model_dir, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text(EVAL_TEXT)
    result = run_cli("export", str(model_dir), "--format", "onnx", "--eval-text", str(text),
                     "--output", str(tmp_path / "onnx"))
    assert result.returncode == 2 and "--eval-text applies to" in result.stderr
    assert not (tmp_path / "onnx").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    result = run_cli("export", str(model_dir), "--format", "gguf", "--dtype", "q4_k_m",
                     "--eval-text", str(empty), "--output", str(tmp_path / "m.gguf"))
    assert result.returncode == 2 and "is empty" in result.stderr
    assert not (tmp_path / "m.gguf").exists()
