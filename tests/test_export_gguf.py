"""GGUF export checked with the real runtime: llama-cpp-python (llama.cpp) loads what we write.

Models are trained by the tool itself on Shakespeare: one with a 512-token BPE it trains, one
with a 260-token vocabulary (256 bytes + 4 specials: one token per byte). For each, llama.cpp
must tokenise like our tokenizer, continue a prompt greedily with the same 32 token ids as
`largeforge generate` (F32 and F16 files), and the Q8_0 file must keep perplexity within 2%
of F32. Random tiny Qwen2, Llama and Mistral models check the tensor layouts logit by logit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

import tiny_models
from conftest import SHARED_DATA, run_cli
from largeforge.config import load_recipe
from largeforge.errors import LargeForgeError
from largeforge.export.gguf import export_gguf, permute_for_llama_rope
from largeforge.inference.generate import (
    encode_prompt,
    generate,
    generate_ids,
    load_for_inference,
    model_eos_ids,
)
from largeforge.inference.sampling import SamplingParams
from largeforge.training.loop import train

llama_cpp = pytest.importorskip("llama_cpp")

CONTEXT = 128
PROMPT = "ROMEO:\nWhat light through yonder"
# fp32 on both sides; llama.cpp sums in a different order, so logits differ by rounding only.
LOGIT_TOLERANCE = 1e-4
PROMPTS = [PROMPT, "First Citizen:\nWe are", "KING HENRY:\nThe"]
TRICKY = [
    "Hello world",
    "  two  spaces,\ttab\nnewline\n\n  indented",
    "numbers 12345 and 3.14159!",
    "unicode: café, naïve, 日本語, emoji 🙂",
    "don't won't it's we'll they've I'm",
    "trailing spaces   ",
    "ROMEO:\nBut soft, what light",
]


def shakespeare() -> str:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Two models trained by `largeforge train` (library API): BPE-512 and byte-level-260."""
    root = tmp_path_factory.mktemp("gguf-train")
    corpus = root / "corpus.txt"
    corpus.write_text(shakespeare()[:100_000], encoding="utf-8")
    runs = {}
    # 200 small steps at a high learning rate (a few seconds each on 2 idle cores): enough for
    # greedy output that is more than one token repeated.
    for name, vocab in (("bpe", 512), ("char", 260)):
        recipe = {
            "model": {"preset": "tiny", "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                      "hidden_dim": 128, "max_seq_len": CONTEXT},
            "tokenizer": {"vocab_size": vocab},
            "data": {"train": [str(corpus)], "seq_len": 64, "split": "tail"},
            "train": {"batch_size": 8, "max_steps": 200, "lr": 1e-2, "warmup_steps": 5,
                      "eval_every": 200, "eval_batches": 1, "log_every": 200,
                      "precision": "fp32"},
            "output": {"dir": str(root / "runs"), "name": name},
        }
        train(load_recipe(recipe, environ={}))
        runs[name] = root / "runs" / name
    return runs


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Every trained model in every GGUF type, exported once for the module."""
    out = tmp_path_factory.mktemp("gguf-out")
    files = {}
    for name, run in trained.items():
        for dtype in ("f32", "f16", "q8_0", "q4_0"):
            files[name, dtype] = export_gguf(str(run), out / f"{name}-{dtype}.gguf", dtype=dtype)
    return files


def open_llama(path: Path, **kwargs) -> llama_cpp.Llama:
    # An fp32 KV cache (llama.cpp's default is f16), so an F32 file computes in fp32 throughout.
    return llama_cpp.Llama(str(path), n_ctx=CONTEXT, n_threads=1, n_batch=CONTEXT, seed=0,
                           type_k=F32_CACHE, type_v=F32_CACHE, verbose=False, **kwargs)


F32_CACHE = int(gguf.GGMLQuantizationType.F32)


class Opened:
    """A llama-cpp-python model that is closed at the end of the `with` block."""

    def __init__(self, path: Path, **kwargs) -> None:
        self.llm = open_llama(path, **kwargs)

    def __enter__(self) -> llama_cpp.Llama:
        return self.llm

    def __exit__(self, *exc: object) -> None:
        self.llm.close()


def is_end_of_generation(llm: llama_cpp.Llama, token: int) -> bool:
    return bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, token))


def llama_greedy(llm: llama_cpp.Llama, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy continuation in llama.cpp (temperature 0, top-k 1), stopping at EOS like ours."""
    out: list[int] = []
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
        if is_end_of_generation(llm, token):
            break
        out.append(int(token))
        if len(out) == n:
            break
    return out


def llama_logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def llama_perplexity(path: Path, chunks: list[list[int]]) -> float:
    """exp(mean negative log-likelihood) of every next token, each chunk evaluated alone."""
    nll, count = 0.0, 0
    with Opened(path, logits_all=True) as llm:
        for chunk in chunks:
            logp = log_softmax(llama_logits(llm, chunk))
            nll -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
            count += len(chunk) - 1
    return math.exp(nll / count)


def held_out_chunks(tokenizer, n_chunks: int = 4) -> list[list[int]]:
    """BOS + CONTEXT-1 tokens of Shakespeare the models never saw (they trained on the first
    100k characters)."""
    ids = tokenizer(shakespeare()[900_000:960_000], add_special_tokens=False)["input_ids"]
    size = CONTEXT - 1
    return [[tokenizer.bos_token_id, *ids[i * size:(i + 1) * size]] for i in range(n_chunks)]


# --- tokenizer -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bpe", "char"])
def test_llama_cpp_tokenises_like_our_tokenizer(trained, exported, name):
    _, tokenizer = load_for_inference(trained[name], device="cpu")
    with Opened(exported[name, "f32"], vocab_only=True) as llm:
        for text in TRICKY:
            ours = tokenizer(text, add_special_tokens=False)["input_ids"]
            theirs = llm.tokenize(text.encode(), add_bos=False, special=False)
            assert theirs == ours, text
            assert llm.detokenize(theirs).decode("utf-8") == text
        # BOS as `largeforge generate` puts it (add_bos_token), and specials parsed as tokens.
        assert llm.tokenize(PROMPT.encode(), add_bos=True) == encode_prompt(
            tokenizer, PROMPT)[0].tolist()
        assert llm.tokenize(b"</s>", add_bos=False, special=True) == [tokenizer.eos_token_id]
    if name == "char":
        assert len(tokenizer) == 260 and len(tokenizer("abc")["input_ids"]) == 3


def test_metadata_is_what_llama_cpp_expects(trained, exported):
    _, tokenizer = load_for_inference(trained["bpe"], device="cpu")
    reader = gguf.GGUFReader(exported["bpe", "f32"])

    def value(key: str):
        return reader.fields[key].contents()

    assert value("general.architecture") == "llama"
    assert value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.pre") == "gpt-2"
    tokens = value("tokenizer.ggml.tokens")
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = value("tokenizer.ggml.token_type")
    assert types[:4] == [gguf.TokenType.CONTROL] * 4  # <pad> <unk> <s> </s>
    assert set(types[4:]) == {gguf.TokenType.NORMAL}
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    assert len(value("tokenizer.ggml.merges")) == len(spec["model"]["merges"]) > 0
    assert value("tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id == 2
    assert value("tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id == 3
    assert value("tokenizer.ggml.padding_token_id") == tokenizer.pad_token_id
    assert value("tokenizer.ggml.add_bos_token") is True
    assert value("llama.context_length") == CONTEXT
    assert value("llama.attention.head_count_kv") == 2
    assert value("llama.rope.freq_base") == pytest.approx(10000.0)
    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names  # tied embeddings: llama.cpp reuses token_embd
    assert {"token_embd.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight"} <= names
    q4 = gguf.GGUFReader(exported["bpe", "q4_0"])
    types_by_name = {t.name: t.tensor_type for t in q4.tensors}
    assert types_by_name["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types_by_name["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types_by_name["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_chat_template_and_end_of_turn_token_are_written(tmp_path):
    tokenizer = tiny_models.make_tokenizer(["hello there"], "<|im_start|>", "<|im_end|>")
    from largeforge.chat_templates import CHATML

    tokenizer.chat_template = CHATML
    model = tiny_models.make_model(len(tokenizer), 64)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    out = export_gguf(str(tmp_path / "m"), tmp_path / "chat.gguf", dtype="f32")
    reader = gguf.GGUFReader(out)
    assert reader.fields["tokenizer.chat_template"].contents() == CHATML
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert reader.fields["tokenizer.ggml.eot_token_id"].contents() == im_end
    with Opened(out, vocab_only=True) as llm:
        assert llm.tokenize(b"<|im_end|>", add_bos=False, special=True) == [im_end]
        assert is_end_of_generation(llm, im_end)


# --- generation and perplexity --------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("name", ["bpe", "char"])
def test_greedy_continuation_matches_ours(trained, exported, name, dtype):
    model, tokenizer = load_for_inference(trained[name], device="cpu")
    params = SamplingParams(max_new_tokens=32, temperature=0)
    seen: set[int] = set()
    with Opened(exported[name, dtype]) as llm:
        for prompt in PROMPTS:
            prompt_ids = encode_prompt(tokenizer, prompt)
            ours = list(generate_ids(model, prompt_ids, params, model_eos_ids(model, tokenizer)))
            theirs = llama_greedy(llm, prompt_ids[0].tolist(), 32)
            assert len(ours) == 32
            assert theirs == ours, prompt
            text = llm.detokenize(theirs).decode("utf-8", errors="replace")
            assert text == generate(model, prompt, tokenizer, max_new_tokens=32, temperature=0)
            seen.update(ours)
    assert len(seen) >= 4  # the continuations are not one token repeated


@pytest.mark.parametrize("name", ["bpe", "char"])
def test_f32_logits_match_ours_on_held_out_text(trained, exported, name):
    model, tokenizer = load_for_inference(trained[name], device="cpu")
    chunk = held_out_chunks(tokenizer, 1)[0]
    with torch.no_grad():
        ours = model(torch.tensor([chunk])).logits[0].double().numpy()
    with Opened(exported[name, "f32"], logits_all=True) as llm:
        theirs = llama_logits(llm, chunk)
    assert np.abs(theirs - ours).max() < LOGIT_TOLERANCE


@pytest.mark.parametrize("name", ["bpe", "char"])
def test_quantised_perplexity(trained, exported, name, capsys):
    _, tokenizer = load_for_inference(trained[name], device="cpu")
    chunks = held_out_chunks(tokenizer)
    ppl = {dtype: llama_perplexity(exported[name, dtype], chunks)
           for dtype in ("f32", "q8_0", "q4_0")}
    with capsys.disabled():
        print(f"\n{name}: perplexity " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items())
              + f"; q8_0/f32 {ppl['q8_0'] / ppl['f32']:.4f}, q4_0/f32 "
              f"{ppl['q4_0'] / ppl['f32']:.4f}")
    assert ppl["f32"] < len(tokenizer) / 2  # it learnt something: uniform would be len
    assert abs(ppl["q8_0"] / ppl["f32"] - 1) < 0.02
    assert 1 / 1.5 < ppl["q4_0"] / ppl["f32"] < 1.5
    size = {dtype: exported[name, dtype].stat().st_size for dtype in ("f32", "q8_0", "q4_0")}
    assert size["q4_0"] < size["q8_0"] < size["f32"]


def test_q4_0_loads_and_generates(trained, exported):
    _, tokenizer = load_for_inference(trained["bpe"], device="cpu")
    with Opened(exported["bpe", "q4_0"]) as llm:
        out = llama_greedy(llm, encode_prompt(tokenizer, PROMPT)[0].tolist(), 32)
    assert len(out) == 32 and len(set(out)) > 1


# --- architectures --------------------------------------------------------------------------


def random_family_model(family: str, tokenizer, directory: Path, **extra) -> Path:
    """A random tiny model of `family` with a wide init (and random biases), saved with the
    tokenizer, so logits differ clearly from token to token."""
    class_name, sizes = tiny_models.FAMILIES[family]
    config = getattr(transformers, class_name)(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.1, **{**sizes, **extra},
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_models.make_tokenizer(["To be, or not to be, that is the question."])


@pytest.mark.parametrize("family,extra", [
    ("qwen2", {}),
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True, "attention_bias": True}),
    ("mistral", {}),
])
def test_logits_match_per_architecture(family, extra, tokenizer, tmp_path):
    model_dir = random_family_model(family, tokenizer, tmp_path / family, **extra)
    out = export_gguf(str(model_dir), tmp_path / "model.gguf", dtype="f32")
    model, _ = load_for_inference(model_dir, device="cpu")
    ids = encode_prompt(tokenizer, "To be, or not to be: that is the question")[0].tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].double().numpy()
    with Opened(out, logits_all=True) as llm:
        theirs = llama_logits(llm, ids)
    assert ours.std() > 0.5  # logits that really vary
    assert np.abs(theirs - ours).max() < LOGIT_TOLERANCE
    reader = gguf.GGUFReader(out)
    names = {t.name for t in reader.tensors}
    expected_arch = "qwen2" if family == "qwen2" else "llama"
    assert reader.fields["general.architecture"].contents() == expected_arch
    if family == "qwen2":
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    assert ("output.weight" in names) == (not model.config.tie_word_embeddings)


def test_lora_adapter_is_merged(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    base_dir = random_family_model("llama", tokenizer, tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    lora.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    out = export_gguf(str(tmp_path / "adapter"), tmp_path / "merged.gguf", dtype="f32")
    ids = encode_prompt(tokenizer, "that is the question")[0].tolist()
    merged, _ = load_for_inference(tmp_path / "adapter", device="cpu")
    plain = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        want = merged(torch.tensor([ids])).logits[0].double().numpy()
        base_logits = plain(torch.tensor([ids])).logits[0].double().numpy()
    with Opened(out, logits_all=True) as llm:
        theirs = llama_logits(llm, ids)
    assert np.abs(theirs - want).max() < LOGIT_TOLERANCE
    assert np.abs(base_logits - want).max() > 0.05  # the adapter changed the model


def test_permutation_is_the_inverse_of_transformers_conversion():
    # transformers' convert_llama_weights_to_hf permutes Meta's interleaved rows like this;
    # ours must undo it exactly.
    def hf_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
        dim1, dim2 = w.shape
        return (w.reshape(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(0, 2, 1, 3)
                .reshape(dim1, dim2))

    w = np.random.default_rng(0).normal(size=(32, 8))
    assert np.array_equal(permute_for_llama_rope(hf_permute(w, 4), 4), w)


# --- other tokenizers llama.cpp knows -------------------------------------------------------


QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = QWEN2_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


def split_regex_tokenizer(regex: str, ignore_merges: bool):
    """A byte-level BPE with a Split(regex) pre-tokenizer, as Qwen2 and Llama 3 ship them."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator([shakespeare()[:30_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.mark.parametrize("regex,ignore_merges,pre", [
    (QWEN2_REGEX, False, "qwen2"),
    (LLAMA3_REGEX, True, "llama-bpe"),
])
def test_split_regex_tokenizers_map_to_llama_cpp_pre_tokenizers(regex, ignore_merges, pre,
                                                                   tmp_path):
    tok = split_regex_tokenizer(regex, ignore_merges)
    model_dir = random_family_model("llama", tok, tmp_path / "m")
    out = export_gguf(str(model_dir), tmp_path / "m.gguf", dtype="f32")
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == pre
    with Opened(out, vocab_only=True) as llm:
        for text in [*TRICKY, "year 2024: 1234567 items\r\n\r\nDONE"]:
            ours = tok(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == ours, text


# --- refusals: a clear error and nothing written ---------------------------------------------


def assert_nothing_written(directory: Path) -> None:
    assert list(directory.iterdir()) == []


def unsupported_model(config_class: str, tokenizer) -> torch.nn.Module:
    """A tiny model of a family GGUF export does not write."""
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("config_class", ["GPTNeoXConfig", "StableLmConfig"])
def test_unsupported_architecture_is_refused(config_class, tokenizer, tmp_path):
    model = unsupported_model(config_class, tokenizer)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(LargeForgeError) as error:
        export_gguf(str(tmp_path / "m"), out_dir / "m.gguf")
    message = str(error.value)
    assert "LlamaForCausalLM" in message and "Qwen2ForCausalLM" in message
    assert model.config.architectures[0] in message
    assert_nothing_written(out_dir)


def test_unsupported_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(["to be or not to be"] * 3, trainers.WordLevelTrainer(
        special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>")
    model_dir = random_family_model("llama", tok, tmp_path / "m")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(LargeForgeError, match="byte-level BPE.*WordLevel"):
        export_gguf(str(model_dir), out_dir / "m.gguf")
    assert_nothing_written(out_dir)


def test_bad_dtype_and_directory_output_are_refused(tokenizer, tmp_path):
    model_dir = random_family_model("llama", tokenizer, tmp_path / "m")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(LargeForgeError, match="q4_k.*f32, f16, q8_0, q4_0"):
        export_gguf(str(model_dir), out_dir / "m.gguf", dtype="q4_k")
    with pytest.raises(LargeForgeError, match="is a directory"):
        export_gguf(str(model_dir), out_dir)
    with pytest.raises(LargeForgeError, match="not found"):
        export_gguf(str(tmp_path / "missing"), out_dir / "m.gguf")
    assert_nothing_written(out_dir)


def test_export_replaces_a_file_atomically(tokenizer, tmp_path):
    model_dir = random_family_model("llama", tokenizer, tmp_path / "m")
    target = tmp_path / "out" / "model.gguf"
    target.parent.mkdir()
    target.write_bytes(b"old")
    # A failing export (an unknown type) leaves the old file as it was.
    with pytest.raises(LargeForgeError):
        export_gguf(str(model_dir), target, dtype="int3")
    assert target.read_bytes() == b"old"
    export_gguf(str(model_dir), target, dtype="f16")
    assert [p.name for p in target.parent.iterdir()] == ["model.gguf"]  # no temp file left
    assert gguf.GGUFReader(target).fields["general.file_type"].contents() == \
        gguf.LlamaFileType.MOSTLY_F16


# --- the CLI --------------------------------------------------------------------------------


def test_cli_exports_gguf(trained, tmp_path):
    out = tmp_path / "cli.gguf"
    proc = run_cli("export", str(trained["bpe"]), "--format", "gguf", "--dtype", "q8_0",
                   "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    with Opened(out) as llm:
        assert llm.n_vocab() == 512


def test_cli_refuses_unsupported_architecture(tokenizer, tmp_path):
    model = unsupported_model("GPTNeoXConfig", tokenizer)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = run_cli("export", str(tmp_path / "m"), "--format", "gguf", "--output",
                   str(out_dir / "m.gguf"))
    assert proc.returncode == 2
    assert "GPTNeoXForCausalLM" in proc.stderr and "supported architectures" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert_nothing_written(out_dir)
