"""Ollama export: `model.gguf` + a `Modelfile` whose Go template renders like our Jinja one.

Ollama is not installed here, so its template step is reproduced with the real thing it is
built on: a small Go program (`tests/data/export/ollama_render.go`, compiled with the local Go
toolchain) that does what Ollama's server does with a TEMPLATE (`text/template` with
missingkey=zero, the Modelfile's SYSTEM in front of a conversation without one, same-role
messages collated). Its output is compared with `tokenizer.apply_chat_template` for every
built-in template, and llama.cpp (llama-cpp-python) tokenises it from the exported GGUF to the
same ids `largeforge chat` feeds the model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import gguf
import pytest
import torch

import tiny_models
from conftest import run_cli
from largeforge.chat_templates import BUILTIN_TEMPLATES, save_chat_template
from largeforge.errors import LargeForgeError
from largeforge.export.ollama import export_ollama
from largeforge.inference.chat import ChatSession
from largeforge.inference.generate import generate_ids, load_for_inference
from largeforge.inference.sampling import SamplingParams
from largeforge.ollama_templates import ALPACA_PREAMBLE

llama_cpp = pytest.importorskip("llama_cpp")

RENDERER = Path(__file__).parent / "data" / "export" / "ollama_render.go"
SYSTEM = {"role": "system", "content": "You are a terse assistant."}
TWO_TURNS = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello. How can I help?"},
    {"role": "user", "content": "What is 2+2?\nAnswer briefly."},
]


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """render(template, messages, system) -> text, by Ollama's rules in Go's text/template."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("the Go toolchain is needed to run Ollama's template engine (apt-get "
                    "install golang-go)")
    root = tmp_path_factory.mktemp("go")
    binary = root / "ollama_render"
    env = dict(os.environ, GOCACHE=str(root / "cache"))
    subprocess.run([go, "build", "-o", str(binary), str(RENDERER)], env=env, check=True,
                   capture_output=True, timeout=300)

    def render(template: str, messages: list[dict], system: str | None = None) -> str:
        proc = subprocess.run(
            [str(binary)], input=json.dumps(
                {"template": template, "system": system, "messages": messages}),
            capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    return render


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """A random tiny Llama whose tokenizer has ChatML's markers as special tokens."""
    root = tmp_path_factory.mktemp("ollama-base")
    tokenizer = tiny_models.make_tokenizer(
        ["Hi there, how can I help? What is 2+2? Answer briefly. You are terse."],
        "<|im_start|>", "<|im_end|>")
    model = tiny_models.make_model(len(tokenizer), 128)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model"


def with_template(base: Path, template: str | None, directory: Path) -> Path:
    shutil.copytree(base, directory)
    if template is not None:
        _, tokenizer = load_for_inference(directory, device="cpu")
        save_chat_template(tokenizer, template, directory)
    return directory


def parse_modelfile(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    params: dict[str, list[str]] = {}
    for name, value in re.findall(r"^PARAMETER (\w+) (.+)$", text, re.M):
        params.setdefault(name, []).append(json.loads(value) if value.startswith('"') else value)
    return {"from": re.search(r"^FROM (.+)$", text, re.M).group(1),
            "template": template.group(1) if template else None,
            "system": system.group(1) if system else None, "params": params}


@pytest.fixture(scope="module")
def exports(base_model, tmp_path_factory) -> dict[str, Path]:
    """The base model with each built-in template, exported for Ollama."""
    root = tmp_path_factory.mktemp("ollama-exports")
    out = {}
    for name, template in BUILTIN_TEMPLATES.items():
        model_dir = with_template(base_model, template, root / f"{name}-model")
        out[name] = export_ollama(str(model_dir), root / name, dtype="f32")
    return out


def jinja(tokenizer, template: str, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_go_template_renders_like_our_template(name, exports, base_model, go_render):
    _, tokenizer = load_for_inference(base_model, device="cpu")
    template = BUILTIN_TEMPLATES[name]
    modelfile = parse_modelfile(exports[name] / "Modelfile")
    assert modelfile["from"] == "./model.gguf" and (exports[name] / "model.gguf").is_file()
    go = modelfile["template"]
    system = modelfile["system"]
    # A two-turn chat (system + user + assistant + user), as our template renders it with the
    # assistant cue.
    chat = [SYSTEM, *TWO_TURNS]
    assert go_render(go, chat, system) == jinja(tokenizer, template, chat, True)
    # Without a system message: the template's own default (Alpaca's preamble comes from the
    # Modelfile's SYSTEM, which Ollama puts in front).
    assert go_render(go, TWO_TURNS, system) == jinja(tokenizer, template, TWO_TURNS, True)
    # A conversation ending with an assistant message is left open for the model to continue
    # (Ollama's "prefill"): a beginning of the closed conversation, ending in the reply.
    partial = [SYSTEM, *TWO_TURNS[:2]]
    rendered = go_render(go, partial, system)
    assert jinja(tokenizer, template, partial, False).startswith(rendered)
    assert rendered.endswith(TWO_TURNS[1]["content"])


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_llama_cpp_feeds_the_tokens_largeforge_chat_feeds(name, exports, base_model,
                                                          go_render):
    model, tokenizer = load_for_inference(base_model, device="cpu")
    template = BUILTIN_TEMPLATES[name]
    modelfile = parse_modelfile(exports[name] / "Modelfile")
    chat = [SYSTEM, *TWO_TURNS]
    text = go_render(modelfile["template"], chat, modelfile["system"])
    want = ChatSession(model, tokenizer, chat_template=template).prompt_ids(chat)[0].tolist()
    llm = llama_cpp.Llama(str(exports[name] / "model.gguf"), vocab_only=True, verbose=False)
    try:
        # As Ollama tokenises a prompt: special tokens parsed, BOS as the GGUF says.
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == want
    finally:
        llm.close()


def test_modelfile_parameters(exports, base_model):
    _, tokenizer = load_for_inference(base_model, device="cpu")
    chatml = parse_modelfile(exports["chatml"] / "Modelfile")
    assert chatml["params"]["stop"] == ["<|im_end|>", "<|im_start|>"]
    assert chatml["params"]["temperature"] == ["0.8"]
    assert chatml["params"]["num_ctx"] == ["128"]
    assert chatml["system"] is None
    assert parse_modelfile(exports["llama-3"] / "Modelfile")["params"]["stop"][0] == "<|eot_id|>"
    assert parse_modelfile(exports["zephyr"] / "Modelfile")["params"]["stop"][0] == \
        tokenizer.eos_token
    alpaca = parse_modelfile(exports["alpaca"] / "Modelfile")
    assert alpaca["system"] == ALPACA_PREAMBLE
    assert alpaca["params"]["stop"] == [tokenizer.eos_token, "### Instruction:"]
    reader = gguf.GGUFReader(exports["chatml"] / "model.gguf")
    assert reader.fields["tokenizer.chat_template"].contents() == BUILTIN_TEMPLATES["chatml"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert reader.fields["tokenizer.ggml.eot_token_id"].contents() == im_end
    # Chat prompts get BOS only where `largeforge chat` puts it: this tokenizer adds none when
    # it encodes (no post-processor), and ChatML writes none.
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is False


def test_chat_reply_matches_in_llama_cpp(exports, base_model, go_render):
    """The F32 export continues the rendered chat greedily exactly as our model does."""
    model, tokenizer = load_for_inference(base_model, device="cpu")
    session = ChatSession(model, tokenizer, chat_template=BUILTIN_TEMPLATES["chatml"],
                          params=SamplingParams(max_new_tokens=16, temperature=0))
    chat = [SYSTEM, *TWO_TURNS]
    prompt = session.prompt_ids(chat)
    ours = list(generate_ids(model, prompt, session.params, session.eos_ids))
    llm = llama_cpp.Llama(str(exports["chatml"] / "model.gguf"), n_ctx=128, verbose=False,
                          type_k=0, type_v=0)
    try:
        modelfile = parse_modelfile(exports["chatml"] / "Modelfile")
        tokens = llm.tokenize(go_render(modelfile["template"], chat).encode(), add_bos=True,
                              special=True)
        theirs = []
        for token in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or len(theirs) == 16:
                break
            theirs.append(int(token))
    finally:
        llm.close()
    assert len(ours) > 3 and theirs == ours


def test_model_without_chat_template_gets_a_completion_template(base_model, tmp_path):
    out = export_ollama(str(base_model), tmp_path / "plain", dtype="q4_0")
    modelfile = parse_modelfile(out / "Modelfile")
    assert modelfile["template"] == "{{ .Prompt }}" and "stop" not in modelfile["params"]
    reader = gguf.GGUFReader(out / "model.gguf")
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is True  # like `generate`
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0


def test_unknown_template_is_refused_unless_a_built_in_is_named(base_model, tmp_path):
    custom = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    model_dir = with_template(base_model, custom, tmp_path / "custom")
    out = tmp_path / "out"
    with pytest.raises(LargeForgeError, match="unlike any of LargeForge's built-in.*chatml"):
        export_ollama(str(model_dir), out)
    assert not out.exists()
    with pytest.raises(LargeForgeError, match="unknown chat template 'nope'"):
        export_ollama(str(model_dir), out, chat_template="nope")
    assert not out.exists()
    export_ollama(str(model_dir), out, chat_template="zephyr")
    assert "<|assistant|>" in parse_modelfile(out / "Modelfile")["template"]
    reader = gguf.GGUFReader(out / "model.gguf")
    assert reader.fields["tokenizer.chat_template"].contents() == BUILTIN_TEMPLATES["zephyr"]


def test_output_directory_rules(exports, base_model, tmp_path):
    model_dir = exports["chatml"].parent / "chatml-model"
    # A file, or a directory holding other things: refused, nothing touched.
    (tmp_path / "file").write_text("x")
    with pytest.raises(LargeForgeError, match="is a file"):
        export_ollama(str(model_dir), tmp_path / "file")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(LargeForgeError, match=r"holds other files \(notes.txt\)"):
        export_ollama(str(model_dir), busy)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    with pytest.raises(LargeForgeError, match="unknown GGUF type"):
        export_ollama(str(model_dir), tmp_path / "new", dtype="q2_k")
    assert not (tmp_path / "new").exists()
    # A previous export is replaced; with overwrite, so is a directory holding other files.
    again = tmp_path / "again"
    export_ollama(str(model_dir), again, dtype="f16")
    export_ollama(str(model_dir), again, dtype="q8_0")  # llama.cpp's quantizer: + its report
    assert sorted(p.name for p in again.iterdir()) == ["Modelfile", "model.gguf",
                                                        "model.perplexity.json"]
    assert gguf.GGUFReader(again / "model.gguf").fields["general.file_type"].contents() == \
        gguf.LlamaFileType.MOSTLY_Q8_0
    export_ollama(str(model_dir), busy, overwrite=True, dtype="f16")
    assert sorted(p.name for p in busy.iterdir()) == ["Modelfile", "model.gguf"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


# ChatML that writes a system prompt of its own when the conversation has none, as real chat
# models do (SmolLM2's template is one): Ollama gets ChatML with that prompt as SYSTEM.
CHATML_WITH_DEFAULT_SYSTEM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_a_template_that_renders_like_a_built_in_is_translated(base_model, tmp_path,
                                                               go_render):
    model_dir = with_template(base_model, CHATML_WITH_DEFAULT_SYSTEM, tmp_path / "default")
    out = export_ollama(str(model_dir), tmp_path / "out", dtype="q8_0")
    modelfile = parse_modelfile(out / "Modelfile")
    assert modelfile["system"] == "You are a tiny test model."
    _, tokenizer = load_for_inference(model_dir, device="cpu")
    for chat in (TWO_TURNS, [SYSTEM, *TWO_TURNS]):
        assert go_render(modelfile["template"], chat, modelfile["system"]) == jinja(
            tokenizer, CHATML_WITH_DEFAULT_SYSTEM, chat, True)


def test_cli_exports_for_ollama(exports, tmp_path):
    model_dir = exports["chatml"].parent / "chatml-model"
    out = tmp_path / "ollama"
    proc = run_cli("export", str(model_dir), "--format", "ollama", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf",
                                                      "model.perplexity.json"]
    assert parse_modelfile(out / "Modelfile")["params"]["stop"][0] == "<|im_end|>"
    assert "perplexity" in proc.stdout and "(f16)" in proc.stdout


def test_cli_refuses_an_unknown_template(base_model, tmp_path):
    model_dir = with_template(base_model, "{{ messages[0]['content'] }}", tmp_path / "m")
    out = tmp_path / "ollama"
    proc = run_cli("export", str(model_dir), "--format", "ollama", "--output", str(out))
    assert proc.returncode == 2
    assert "built-in templates" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_greedy_parity_needs_a_model_that_varies(base_model):
    # Guard for test_chat_reply_matches_in_llama_cpp: the random model's greedy output is not
    # one token repeated, so equal ids mean something.
    model, _ = load_for_inference(base_model, device="cpu")
    ids = list(generate_ids(model, torch.tensor([[2, 10, 20, 30]]),
                            SamplingParams(max_new_tokens=16, temperature=0), set()))
    assert len(set(ids)) > 3
