"""Byte-level BPE tokenizers: training, exact round trips, saving, loading and fingerprints."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from largeforge.errors import LargeForgeError
from largeforge.tokenizer import (
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    load_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)

VOCAB = 400


@pytest.fixture(scope="module")
def corpus(shared_data):
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:60_000]
    return [text[i:i + 2000] for i in range(0, len(text), 2000)]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer(iter(corpus), VOCAB, path), path


@pytest.fixture(scope="module")
def shared_data():  # module scope for the fixtures above; same check as conftest's
    from conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


ROUND_TRIP = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n and \r carriage returns",
    "control \x00\x01\x07\x1b[31m\x7f characters",
    "unicode: héllo wörld — naïve café, Ελληνικά, русский, 日本語, 한국어, עברית, العربية",
    "emoji: 🎉🐍👩‍👩‍👧‍👦 🏳️‍🌈 and a skin tone 👍🏽",
    "combining: e\u0301 a\u0308 zero width\u200bspace \ufeffBOM",
    "astral: 𝄞 𝕏 \U0010ffff",
    "",
    " ",
    "\n\n\n",
]


def test_vocab_and_special_token_ids(trained):
    tokenizer, _ = trained
    assert len(tokenizer) == VOCAB
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id) == (0, 1)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (2, 3)
    # learned merges beyond the 256 byte symbols and 4 specials
    vocab = tokenizer.get_vocab()
    assert any(len(token) > 1 and token not in SPECIAL_TOKENS for token in vocab)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(trained, text):
    tokenizer, _ = trained
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_every_byte_is_representable(trained):
    tokenizer, _ = trained
    text = "".join(chr(c) for c in range(1, 0x800)) + "".join(chr(c) for c in range(0x1F300,
                                                                                   0x1F340))
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_special_token_strings_in_text(trained):
    # Hugging Face matches special-token strings in raw text; decoding still gives the text back
    tokenizer, _ = trained
    text = "specials as text: <s> </s> <pad> <unk>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert [i for i in ids if i < 4] == [2, 3, 0, 1]
    assert tokenizer.decode(ids) == text


def test_no_special_tokens_added_by_default(trained):
    tokenizer, _ = trained
    ids = tokenizer.encode("To be, or not to be")
    assert ids == tokenizer.encode("To be, or not to be", add_special_tokens=False)
    assert not set(ids) & {0, 1, 2, 3}


def test_compresses_the_training_text(trained, corpus):
    tokenizer, _ = trained
    ids = tokenizer.encode(corpus[0], add_special_tokens=False)
    assert len(ids) < 0.7 * len(corpus[0].encode("utf-8"))


def test_saved_files_load_with_auto_tokenizer(trained):
    tokenizer, path = trained
    assert (path / "tokenizer.json").is_file()
    assert (path / "tokenizer_config.json").is_file()
    auto = AutoTokenizer.from_pretrained(str(path))
    assert len(auto) == VOCAB
    assert (auto.bos_token, auto.eos_token, auto.pad_token, auto.unk_token) == (
        "<s>", "</s>", "<pad>", "<unk>"
    )
    for text in ROUND_TRIP:
        assert auto.encode(text) == tokenizer.encode(text)
        assert auto.decode(auto.encode(text)) == text
    # no staging directory is left beside the output
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokenizer"]


def test_load_tokenizer_and_fingerprint(trained, tmp_path):
    tokenizer, path = trained
    again = load_tokenizer(path)
    assert again.encode("Wherefore art thou") == tokenizer.encode("Wherefore art thou")
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(path))) == (
        tokenizer_fingerprint(tokenizer)
    )
    # a run directory holding the tokenizer in `tokenizer/`
    assert tokenizer_fingerprint(load_tokenizer(path.parent)) == tokenizer_fingerprint(tokenizer)


def test_load_tokenizer_error(tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(LargeForgeError, match="cannot load a tokenizer from"):
        load_tokenizer(empty)


def test_fingerprint_differs_for_different_vocab(trained, corpus, tmp_path):
    tokenizer, _ = trained
    other = train_tokenizer(corpus, VOCAB - 60, tmp_path / "small")
    assert len(other) == VOCAB - 60
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)
    different_text = train_tokenizer(["zzzz yyyy xxxx " * 50, "qqq www " * 40], VOCAB,
                                      tmp_path / "other-text", min_frequency=1)
    assert tokenizer_fingerprint(different_text) != tokenizer_fingerprint(tokenizer)


def test_training_is_deterministic(corpus, trained, tmp_path):
    tokenizer, _ = trained
    again = train_tokenizer(corpus, VOCAB, tmp_path / "again")
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tokenizer)


def test_vocab_too_small_raises_before_writing(tmp_path):
    consumed = []

    def texts():
        consumed.append(True)
        yield "some text"

    for size in (3, 0, MIN_VOCAB_SIZE - 1):
        with pytest.raises(LargeForgeError, match=f"vocab size {size} is too small"):
            train_tokenizer(texts(), size, tmp_path / "out")
    assert not consumed
    assert list(tmp_path.iterdir()) == []


def test_min_vocab_size_works(tmp_path):
    tokenizer = train_tokenizer(["a tiny text with café and 🎉"], MIN_VOCAB_SIZE, tmp_path / "t")
    assert len(tokenizer) == MIN_VOCAB_SIZE == 260
    text = "anything at all: ж 😀 \x00"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_refuses_non_empty_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(LargeForgeError, match="already exists and is not empty"):
        train_tokenizer(["text"], 300, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_empty_output_dir_is_accepted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    tokenizer = train_tokenizer(["hello hello hello world"], 280, out)
    assert (out / "tokenizer.json").is_file()
    assert MIN_VOCAB_SIZE < len(tokenizer) <= 280  # a few merges; the text allows no more
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_no_text_raises_and_writes_nothing(tmp_path):
    with pytest.raises(LargeForgeError, match="no text"):
        train_tokenizer(iter([]), 300, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_model_max_length(tmp_path):
    tokenizer = train_tokenizer(["abc abc abc"], 270, tmp_path / "t", model_max_length=128)
    assert tokenizer.model_max_length == 128
    assert AutoTokenizer.from_pretrained(str(tmp_path / "t")).model_max_length == 128
