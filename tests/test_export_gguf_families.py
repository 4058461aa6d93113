"""GGUF export of every family `train sft` supports, and of every tokenizer kind, checked in
llama.cpp (llama-cpp-python) with an F32 file and an F32 KV cache.

For each family (a random tiny model with the tokenizer kind the real family ships): llama.cpp
tokenises our prompts into the same ids as the Hugging Face tokenizer, continues them greedily
with the same 32 tokens as `largeforge.inference.generate` and as `transformers`' greedy
`generate`, and its logits are within 1e-3 of ours. The GELU families (phi2, gemma, gpt2) differ
by up to ~1e-3 only because ggml computes GELU through an fp16 lookup table; with that table's
rounding reproduced on our side they agree within 1e-4, which pins down the layout exactly.

For each tokenizer kind (SentencePiece "llama" vocab, llama-bpe, qwen2, smollm, gpt-2) llama.cpp
tokenises tricky strings (digits, spaces, tabs, newlines, unicode) like the HF tokenizer; the
SentencePiece ones also like SentencePiece itself, and the SmolLM one like llama.cpp does with
the real SmolLM2-135M-Instruct GGUF.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

import tiny_models
from conftest import smollm2_gguf
from largeforge.errors import LargeForgeError
from largeforge.export.gguf import export_gguf
from largeforge.inference.generate import (
    encode_prompt,
    generate_ids,
    load_for_inference,
    model_eos_ids,
)
from largeforge.inference.sampling import SamplingParams
from test_export_gguf import (
    LLAMA3_REGEX,
    QWEN2_REGEX,
    TRICKY,
    Opened,
    llama_greedy,
    llama_logits,
)

llama_cpp = pytest.importorskip("llama_cpp")

LOGIT_TOLERANCE = 1e-3
EMULATED_GELU_TOLERANCE = 5e-4
CORPUS = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "And by opposing end them. To die: to sleep;",
    "No more; and by a sleep to say we end",
    "The heart-ache and the thousand natural shocks",
    "That flesh is heir to, 'tis a consummation",
    "In 2024 we counted 1234567 items at 3.14159 each, don't you think?",
    "Café au lait, naïve façade, 日本語のテキスト, emoji 🙂 and tabs\tand  double  spaces.",
    "def main():\n    return 42\n\n",
]
PROMPTS = ["To be, or not to be", "The heart-ache and the", "In 2024 we counted"]
MORE_TRICKY = [*TRICKY, "year 2024: 1234567 items\r\n\r\nDONE", "x", "  ", "\n\nend",
               "a<b> c", "ﬁne Ａ ½"]


# --- tokenizers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentencepiece_model():
    pytest.importorskip("sentencepiece")
    return tiny_models.train_sentencepiece(CORPUS * 3)


@pytest.fixture(scope="module")
def tokenizers(sentencepiece_model) -> dict[str, transformers.PreTrainedTokenizerBase]:
    """One tokenizer per kind, by the `tokenizer.ggml.pre` (or "spm...") it must get."""
    gemma_sp = tiny_models.train_sentencepiece(CORPUS * 3, add_dummy_prefix=False)
    return {
        "spm": tiny_models.make_sentencepiece_tokenizer(sentencepiece_model),
        "spm-metaspace": tiny_models.make_sentencepiece_tokenizer(sentencepiece_model,
                                                                  metaspace=True),
        "spm-no-prefix": tiny_models.make_sentencepiece_tokenizer(gemma_sp, add_prefix=False),
        "gpt-2": tiny_models.make_tokenizer(CORPUS),
        "qwen2": tiny_models.make_split_regex_tokenizer(CORPUS, QWEN2_REGEX),
        "llama-bpe": tiny_models.make_split_regex_tokenizer(CORPUS, LLAMA3_REGEX,
                                                           ignore_merges=True),
    }


def save_model(model: torch.nn.Module, tokenizer, directory: Path) -> Path:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def export_vocab(tokenizer, tmp_path: Path, name: str) -> Path:
    """`tokenizer` with a tiny random Llama, exported to F32 GGUF."""
    model = tiny_models.make_family_model("llama", tokenizer)
    return export_gguf(str(save_model(model, tokenizer, tmp_path / name)),
                       tmp_path / f"{name}.gguf", dtype="f32")


def field(path: Path, key: str):
    return gguf.GGUFReader(path).fields[key].contents()


def assert_same_ids(llm, tokenizer, texts: list[str]) -> None:
    for text in texts:
        ours = tokenizer(text, add_special_tokens=False)["input_ids"]
        theirs = llm.tokenize(text.encode(), add_bos=False, special=False)
        assert theirs == ours, text


@pytest.mark.parametrize("kind,pre", [("gpt-2", "gpt-2"), ("qwen2", "qwen2"),
                                      ("llama-bpe", "llama-bpe")])
def test_byte_level_tokenizers(tokenizers, kind, pre, tmp_path):
    tokenizer = tokenizers[kind]
    out = export_vocab(tokenizer, tmp_path, kind)
    assert field(out, "tokenizer.ggml.model") == "gpt2"
    assert field(out, "tokenizer.ggml.pre") == pre
    with Opened(out, vocab_only=True) as llm:
        assert_same_ids(llm, tokenizer, MORE_TRICKY)
        for text in MORE_TRICKY:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert llm.detokenize(ids).decode("utf-8") == tokenizer.decode(ids)


@pytest.mark.parametrize("kind", ["spm", "spm-no-prefix"])
def test_sentencepiece_tokenizers(tokenizers, sentencepiece_model, kind, tmp_path):
    tokenizer = tokenizers[kind]
    out = export_vocab(tokenizer, tmp_path, kind)
    assert field(out, "tokenizer.ggml.model") == "llama"
    assert field(out, "tokenizer.ggml.add_space_prefix") is (kind == "spm")
    types = field(out, "tokenizer.ggml.token_type")
    assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL,
                         gguf.TokenType.CONTROL]
    assert types[3:259] == [gguf.TokenType.BYTE] * 256
    assert set(types[259:]) == {gguf.TokenType.NORMAL}
    with Opened(out, vocab_only=True) as llm:
        assert_same_ids(llm, tokenizer, MORE_TRICKY)
        if kind == "spm":  # and like SentencePiece itself
            for text in MORE_TRICKY:
                assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
                    sentencepiece_model.encode(text), text
        # BOS as `largeforge generate` puts it, and specials parsed as tokens.
        assert llm.tokenize(PROMPTS[0].encode(), add_bos=True) == \
            encode_prompt(tokenizer, PROMPTS[0])[0].tolist()
        assert llm.tokenize(b"</s>", add_bos=False, special=True) == [tokenizer.eos_token_id]
    # Byte fallback really happens: characters the model never saw become <0xNN> tokens.
    ids = tokenizer("Ω", add_special_tokens=False)["input_ids"]
    assert [tokenizer.convert_ids_to_tokens(i) for i in ids][-2:] == ["<0xCE>", "<0xA9>"]


def test_metaspace_sentencepiece_tokenizer(tokenizers, sentencepiece_model, tmp_path):
    """transformers 5's LlamaTokenizer skips SentencePiece's dummy prefix when the text already
    starts with a space; llama.cpp follows SentencePiece there, and agrees everywhere else."""
    tokenizer = tokenizers["spm-metaspace"]
    out = export_vocab(tokenizer, tmp_path, "metaspace")
    with Opened(out, vocab_only=True) as llm:
        plain = [text for text in MORE_TRICKY if not text.startswith(" ")]
        assert_same_ids(llm, tokenizer, plain)
        for text in MORE_TRICKY:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
                sentencepiece_model.encode(text), text


def smollm2_tokenizer(path: Path) -> transformers.PreTrainedTokenizerFast:
    """SmolLM2's real vocabulary and merges with its real pre-tokenizer (digits one by one,
    then byte-level with GPT-2's regex), as its tokenizer.json has it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False)
                             for t, kind in zip(tokens, types, strict=True)
                             if kind == gguf.TokenType.CONTROL])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|im_end|>")


def test_smollm_pre_tokenizer_matches_the_real_smollm2_gguf(tmp_path):
    real = smollm2_gguf()
    tokenizer = smollm2_tokenizer(real)
    out = export_vocab(tokenizer, tmp_path, "smollm")
    assert field(out, "tokenizer.ggml.pre") == "smollm"
    texts = [*MORE_TRICKY, "3.14159 and 2024-12-31, 1,000,000"]
    with Opened(out, vocab_only=True) as ours, Opened(real, vocab_only=True) as original:
        assert_same_ids(ours, tokenizer, texts)
        for text in texts:
            assert ours.tokenize(text.encode(), add_bos=False, special=False) == \
                original.tokenize(text.encode(), add_bos=False, special=False), text
        assert ours.tokenize(b"<|im_end|>", add_bos=False, special=True) == [2]
    assert tokenizer("12345", add_special_tokens=False)["input_ids"] == \
        [tokenizer.convert_tokens_to_ids(d) for d in "12345"]


def test_smollm2_as_transformers_loads_it(tmp_path):
    """transformers rebuilds SmolLM2's tokenizer from the GGUF as plain byte-level BPE (no
    digit splitting); the export must then tokenise as that tokenizer does: "gpt-2"."""
    real = smollm2_gguf()
    tokenizer = transformers.AutoTokenizer.from_pretrained(real.parent, gguf_file=real.name)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    assert spec["pre_tokenizer"]["type"] == "ByteLevel"
    out = export_vocab(tokenizer, tmp_path, "smollm-hf")
    assert field(out, "tokenizer.ggml.pre") == "gpt-2"
    with Opened(out, vocab_only=True) as llm:
        assert_same_ids(llm, tokenizer, [*MORE_TRICKY, "3.14159 and 2024-12-31, 1,000,000"])


# --- families ----------------------------------------------------------------------------

# The tokenizer kind each family ships with.
FAMILY_TOKENIZERS = {"llama": "spm", "mistral": "spm", "qwen2": "qwen2", "qwen3": "qwen2",
                     "phi": "gpt-2", "phi3": "spm", "gemma": "spm-no-prefix", "gpt2": "gpt-2"}
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "phi": "phi2", "phi3": "phi3", "gemma": "gemma", "gpt2": "gpt2"}
GELU_FAMILIES = ("phi", "gemma", "gpt2")


def random_family_model(family: str, tokenizer, seed: int = 1) -> torch.nn.Module:
    """A random tiny `family` model whose logits vary clearly from token to token: a wider
    init, random biases and random norm weights (so Gemma's 1 + w and LayerNorm biases
    matter). The GELU families get a slightly narrower init: ggml's fp16 GELU table errs in
    proportion to the activations."""
    class_name, sizes = tiny_models.FAMILIES[family]
    config = getattr(transformers, class_name)(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.08 if family in GELU_FAMILIES else 0.1, **sizes,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.2)
            elif "norm" in name or ".ln_" in name:
                param.normal_(0.0 if family == "gemma" else 1.0, 0.1)
    return model.eval()


class Fp16TableGelu(torch.nn.Module):
    """tanh-GELU as ggml's CPU backend computes it: input and output rounded to fp16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, y))


def with_ggml_gelu(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        for attr in ("act_fn", "activation_fn", "act"):
            if isinstance(getattr(module, attr, None), torch.nn.Module):
                setattr(module, attr, Fp16TableGelu())
    return model


def hf_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


@pytest.mark.parametrize("family", list(tiny_models.FAMILIES))
def test_family_in_llama_cpp(family, tokenizers, tmp_path, capsys):
    tokenizer = tokenizers[FAMILY_TOKENIZERS[family]]
    model_dir = save_model(random_family_model(family, tokenizer), tokenizer, tmp_path / "m")
    out = export_gguf(str(model_dir), tmp_path / "m.gguf", dtype="f32")
    assert field(out, "general.architecture") == GGUF_ARCH[family]
    model, tok = load_for_inference(model_dir, device="cpu")
    params = SamplingParams(max_new_tokens=32, temperature=0)
    eos = model_eos_ids(model, tok)
    worst, worst_emulated, seen = 0.0, 0.0, set()
    with Opened(out, logits_all=True) as llm:
        for prompt in PROMPTS:
            prompt_ids = encode_prompt(tok, prompt)
            ids = prompt_ids[0].tolist()
            assert llm.tokenize(prompt.encode(), add_bos=True) == ids, prompt
            ours = list(generate_ids(model, prompt_ids, params, eos))
            hf = model.generate(prompt_ids, max_new_tokens=32, do_sample=False,
                                eos_token_id=sorted(eos),
                                pad_token_id=tok.pad_token_id or 0)[0, len(ids):].tolist()
            theirs = llama_greedy(llm, ids, 32)
            assert len(ours) == 32
            assert theirs == ours == hf, prompt
            seen.update(ours)
            # Logits over the prompt and its continuation.
            sequence = ids + ours
            want = hf_logits(model, sequence)
            got = llama_logits(llm, sequence)
            assert want.std() > 0.5  # logits that really vary
            worst = max(worst, float(np.abs(got - want).max()))
            if family in GELU_FAMILIES:
                emulated = hf_logits(with_ggml_gelu(load_for_inference(model_dir, "cpu")[0]),
                                     sequence)
                worst_emulated = max(worst_emulated, float(np.abs(got - emulated).max()))
    with capsys.disabled():
        print(f"\n{family}: max |logit difference| {worst:.2e}"
              + (f", {worst_emulated:.2e} with ggml's fp16 GELU" if family in GELU_FAMILIES
                 else ""))
    assert worst < LOGIT_TOLERANCE
    assert worst_emulated < EMULATED_GELU_TOLERANCE
    assert len(seen) >= 3  # the continuations are not one token repeated


def test_family_specific_tensors(tokenizers, tmp_path):
    """What each family's layout puts in the file, as llama.cpp's loader expects it."""
    expected = {
        "qwen3": ({"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"}, set()),
        "phi": ({"output.weight", "output.bias", "blk.0.attn_norm.bias", "blk.0.ffn_up.bias"},
                {"blk.0.ffn_norm.weight", "blk.0.ffn_gate.weight"}),
        "phi3": ({"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"},
                 {"blk.0.attn_q.weight", "blk.0.ffn_gate.weight"}),
        "gemma": (set(), {"output.weight"}),
        "gpt2": ({"position_embd.weight", "blk.0.attn_qkv.weight", "blk.0.attn_qkv.bias"},
                 {"output.weight"}),
    }
    for family, (present, absent) in expected.items():
        tokenizer = tokenizers[FAMILY_TOKENIZERS[family]]
        model = random_family_model(family, tokenizer)
        out = export_gguf(str(save_model(model, tokenizer, tmp_path / family)),
                          tmp_path / f"{family}.gguf", dtype="f32")
        reader = gguf.GGUFReader(out)
        names = {t.name for t in reader.tensors}
        assert present <= names and not absent & names, family
        fields = reader.fields
        arch = GGUF_ARCH[family]
        if family in ("phi", "gpt2"):
            assert f"{arch}.attention.layer_norm_epsilon" in fields
        else:
            assert f"{arch}.attention.layer_norm_rms_epsilon" in fields
        if family == "phi":  # partial rotary: half of the 16-wide heads
            assert fields["phi2.rope.dimension_count"].contents() == 8
        if family == "gemma":  # RMSNorm weights as 1 + w
            norm = next(t for t in reader.tensors if t.name == "output_norm.weight")
            assert np.allclose(np.array(norm.data), model.model.norm.weight.detach().numpy() + 1)
        if family == "phi3":  # gate rows first, as llama.cpp's fused SwiGLU reads them
            up = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
            assert np.array_equal(np.array(up.data), model.model.layers[0].mlp
                                  .gate_up_proj.weight.detach().numpy())


# --- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize("family,extra,match", [
    ("gemma", {"tie_word_embeddings": False}, "untied output layer"),
    ("phi", {"qk_layernorm": True}, "qk_layernorm"),
    ("mistral", {"sliding_window": 16}, "sliding window"),
    ("gpt2", {"activation_function": "relu"}, "activation 'relu'"),
])
def test_family_variants_llama_cpp_cannot_run_are_refused(family, extra, match, tokenizers,
                                                          tmp_path):
    class_name, sizes = tiny_models.FAMILIES[family]
    tokenizer = tokenizers["gpt-2"]
    config = getattr(transformers, class_name)(vocab_size=len(tokenizer), **{**sizes, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(LargeForgeError, match=match) as error:
        export_gguf(str(save_model(model, tokenizer, tmp_path / "m")), out_dir / "m.gguf")
    assert "supported architectures" in str(error.value)
    assert list(out_dir.iterdir()) == []


def test_byte_fallback_bpe_whose_merges_are_not_sentencepiece_is_refused(tmp_path):
    """A byte-fallback BPE trained by `tokenizers` has only the merges it learnt; llama.cpp's
    SentencePiece tokenizer would make every piece it can, so it is refused, not mis-written."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Replace(" ", "\u2581")
    trained.train_from_iterator(CORPUS * 5, trainers.BpeTrainer(vocab_size=200,
                                                                show_progress=False))
    learnt = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for token, token_id in learnt["vocab"].items():
        vocab[token] = 259 + token_id
    core = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in learnt["merges"]],
                                byte_fallback=True, unk_token="<unk>"))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                            normalizers.Replace(" ", "\u2581")])
    core.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                      decoders.Fuse()])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    model = tiny_models.make_family_model("llama", tokenizer)
    with pytest.raises(LargeForgeError, match="merges are not SentencePiece's"):
        export_gguf(str(save_model(model, tokenizer, tmp_path / "m")), tmp_path / "m.gguf")


def test_the_real_llama_2_tokenizer(tmp_path):
    """The tokenizer Llama 2 and TinyLlama ship (`tokenizer.model`, 32,000 SentencePiece
    pieces with byte fallback; ../shared/data/tokenizers/llama2), as the tokenizer.json of their
    Hugging Face repositories has it, on a tiny random Llama: llama.cpp tokenises like
    SentencePiece itself and continues greedily like we do."""
    spm = pytest.importorskip("sentencepiece")
    from conftest import SHARED_DATA

    model_file = SHARED_DATA / "tokenizers" / "llama2" / "tokenizer.model"
    if not model_file.is_file():
        pytest.skip(f"shared data not found at {model_file}")
    processor = spm.SentencePieceProcessor(model_file=str(model_file))
    tokenizer = tiny_models.make_sentencepiece_tokenizer(processor)
    assert len(tokenizer) == 32000
    out = export_vocab(tokenizer, tmp_path, "llama2")
    assert field(out, "tokenizer.ggml.model") == "llama"
    texts = MORE_TRICKY
    with Opened(out) as llm:
        assert_same_ids(llm, tokenizer, texts)
        for text in texts:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
                processor.encode(text), text
        model, _ = load_for_inference(tmp_path / "llama2", device="cpu")
        ids = encode_prompt(tokenizer, PROMPTS[0])
        ours = list(generate_ids(model, ids, SamplingParams(temperature=0, max_new_tokens=32),
                                 model_eos_ids(model, tokenizer)))
        assert llama_greedy(llm, ids[0].tolist(), len(ours)) == ours
