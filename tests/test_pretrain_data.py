"""Tokenized pretraining corpora: EOS placement, shards, the cache, and train/val splits."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import largeforge.data.pretrain as pretrain
from largeforge.data.cleaning import in_eval_split
from largeforge.data.pretrain import TokenArray, prepare_pretraining_data
from largeforge.data.sources import resolve_sources
from largeforge.errors import LargeForgeError
from largeforge.tokenizer import train_tokenizer

SEP = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from conftest import SHARED_DATA

    path = SHARED_DATA / "tinyshakespeare.txt"
    text = path.read_text(encoding="utf-8")[:40_000] if path.is_file() else (
        "The quick brown fox jumps over the lazy dog. " * 500
    )
    return train_tokenizer([text], 320, tmp_path_factory.mktemp("tok") / "tok")


def make_docs(n, prefix="doc"):
    return [f"{prefix} {i}: the king {i % 7} speaks to the queen about {i * 13 % 97} swords."
            for i in range(n)]


def write_docs(path, documents):
    path.write_text(SEP.join(documents), encoding="utf-8")
    return path


def expected_stream(tokenizer, documents):
    out = []
    for document in documents:
        out += tokenizer.encode(document, add_special_tokens=False) + [tokenizer.eos_token_id]
    return out


def split_documents(tokenizer, ids):
    """Decode a token stream back into its documents (each ends with EOS)."""
    ids = list(ids)
    eos = tokenizer.eos_token_id
    assert not ids or ids[-1] == eos
    docs, current = [], []
    for token in ids:
        if token == eos:
            docs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    return docs


def entries(cache):
    root = cache / "tokens"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_eos_after_every_document_and_files_on_disk(tmp_path, tokenizer):
    documents = ["First document, with words.", "Second — with ünïcode and 🎉.", "Third\n\nlines"]
    text = write_docs(tmp_path / "a.txt", documents[:2] + ["   "])  # the blank one is skipped
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(json.dumps({"text": documents[2]}) + "\n", encoding="utf-8")
    cache = tmp_path / "cache"
    corpus = prepare_pretraining_data([text, jsonl], tokenizer, val_percent=0, cache_dir=cache)
    assert not corpus.cached
    assert corpus.train.to_numpy().tolist() == expected_stream(tokenizer, documents)
    assert len(corpus.val) == 0
    assert corpus.train.to_numpy().dtype == np.uint16
    assert corpus.path.parent == cache / "tokens"
    manifest = json.loads((corpus.path / "manifest.json").read_text(encoding="utf-8"))
    assert manifest == corpus.manifest
    assert manifest["dtype"] == "uint16" and manifest["eos_token_id"] == tokenizer.eos_token_id
    assert manifest["documents"] == {"train": 3, "val": 0, "total": 3, "skipped_empty": 1}
    assert manifest["sources"] == [str(text), str(jsonl)]
    assert manifest["split"] == "document"
    assert manifest["tokens"] == {"train": len(corpus.train), "val": 0}
    shard = corpus.path / "tokens-00000.bin"
    on_disk = np.fromfile(shard, dtype=np.uint16).tolist()
    assert on_disk == expected_stream(tokenizer, documents)
    assert sorted(p.name for p in corpus.path.iterdir()) == ["manifest.json", "tokens-00000.bin"]
    assert "3 documents" in corpus.summary() and "tokenized" in corpus.summary()


def test_accepts_a_list_of_sources(tmp_path, tokenizer):
    path = write_docs(tmp_path / "a.txt", ["one doc", "two doc"])
    corpus = prepare_pretraining_data(resolve_sources([path]), tokenizer, val_percent=0,
                                      cache_dir=tmp_path / "cache")
    assert corpus.train.to_numpy().tolist() == expected_stream(tokenizer, ["one doc", "two doc"])


def test_second_call_is_cached_and_content_addressed(tmp_path, tokenizer, monkeypatch):
    documents = make_docs(30)
    path = write_docs(tmp_path / "a.txt", documents)
    cache = tmp_path / "cache"
    logs = []
    first = prepare_pretraining_data([path], tokenizer, cache_dir=cache, log=logs.append)
    assert not first.cached and len(logs) == 1 and "30 documents" in logs[0]

    def no_build(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(pretrain, "_build", no_build)
    again = prepare_pretraining_data([path], tokenizer, cache_dir=cache, log=logs.append)
    assert again.cached and again.path == first.path and len(logs) == 1
    assert again.train.to_numpy().tolist() == first.train.to_numpy().tolist()
    assert again.val.to_numpy().tolist() == first.val.to_numpy().tolist()
    assert "cached" in again.summary()
    # a renamed copy has the same bytes: same entry
    copy = tmp_path / "renamed.txt"
    shutil.copy(path, copy)
    assert prepare_pretraining_data([copy], tokenizer, cache_dir=cache).path == first.path
    monkeypatch.undo()
    # changed content: a new entry, tokenized afresh
    write_docs(path, documents + ["one more document"])
    changed = prepare_pretraining_data([path], tokenizer, cache_dir=cache)
    assert not changed.cached and changed.path != first.path
    assert "one more document" in (split_documents(tokenizer, changed.train.to_numpy())
                                   + split_documents(tokenizer, changed.val.to_numpy()))
    # other reading options: another entry
    tail = prepare_pretraining_data([path], tokenizer, cache_dir=cache, split="tail")
    assert not tail.cached
    assert len(entries(cache)) == 3


def test_uses_env_cache_dir_by_default(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("LARGEFORGE_CACHE_DIR", str(tmp_path / "envcache"))
    path = write_docs(tmp_path / "a.txt", ["some document"])
    corpus = prepare_pretraining_data([path], tokenizer)
    assert corpus.path.parent == tmp_path / "envcache" / "tokens"


def test_document_split(tmp_path, tokenizer):
    documents = make_docs(200)
    path = write_docs(tmp_path / "a.txt", documents)
    corpus = prepare_pretraining_data([path], tokenizer, val_percent=10,
                                      cache_dir=tmp_path / "cache")
    assert corpus.manifest["split"] == "document"
    train = split_documents(tokenizer, corpus.train.to_numpy())
    val = split_documents(tokenizer, corpus.val.to_numpy())
    assert 10 <= len(val) <= 40, len(val)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(documents)
    assert corpus.manifest["documents"]["val"] == len(val)
    assert corpus.manifest["documents"]["train"] == len(train)
    # file order is kept within each split
    assert train == [d for d in documents if d in set(train)]
    # deterministic: the same documents in another order, in other files, split the same way
    shuffled = documents[::-1]
    a = write_docs(tmp_path / "b1.txt", shuffled[:77])
    b = write_docs(tmp_path / "b2.txt", shuffled[77:])
    other = prepare_pretraining_data([a, b], tokenizer, val_percent=10,
                                     cache_dir=tmp_path / "cache2")
    assert set(split_documents(tokenizer, other.val.to_numpy())) == set(val)


def test_document_split_follows_val_percent(tmp_path, tokenizer):
    documents = make_docs(200)
    path = write_docs(tmp_path / "a.txt", documents)
    small = prepare_pretraining_data([path], tokenizer, val_percent=10,
                                     cache_dir=tmp_path / "c1")
    large = prepare_pretraining_data([path], tokenizer, val_percent=50,
                                     cache_dir=tmp_path / "c2")
    small_val = set(split_documents(tokenizer, small.val.to_numpy()))
    large_val = set(split_documents(tokenizer, large.val.to_numpy()))
    assert 70 <= len(large_val) <= 130
    assert small_val < large_val  # a stable hash: raising the percentage only adds documents


def test_tail_split(tmp_path, tokenizer):
    documents = make_docs(50)
    path = write_docs(tmp_path / "a.txt", documents)
    corpus = prepare_pretraining_data([path], tokenizer, val_percent=10, split="tail",
                                      cache_dir=tmp_path / "cache")
    stream = expected_stream(tokenizer, documents)
    n_val = round(len(stream) * 0.10)
    assert corpus.manifest["split"] == "tail"
    assert len(corpus.val) == n_val > 0
    assert corpus.val.to_numpy().tolist() == stream[-n_val:]
    assert corpus.train.to_numpy().tolist() == stream[:-n_val]
    assert corpus.manifest["tokens"] == {"train": len(stream) - n_val, "val": n_val}


def _single_document(tokenizer_in_val):
    for i in range(1000):
        text = f"the one and only document, take {i}. " * 10
        if in_eval_split(text, 10.0) == tokenizer_in_val:
            return text
    raise AssertionError("no such document")


@pytest.mark.parametrize("hashed_into_val", [False, True], ids=["hash-train", "hash-val"])
def test_single_document_falls_back_to_tail(tmp_path, tokenizer, hashed_into_val):
    # whichever side the document's hash picks, one document cannot make both splits
    document = _single_document(hashed_into_val)
    path = write_docs(tmp_path / "one.txt", [document])
    corpus = prepare_pretraining_data([path], tokenizer, val_percent=10,
                                      cache_dir=tmp_path / "cache")
    stream = expected_stream(tokenizer, [document])
    assert corpus.manifest["split"] == "tail"
    assert len(corpus.val) > 0 and len(corpus.train) > 0
    assert len(corpus.val) == round(len(stream) * 0.10)
    assert corpus.train.to_numpy().tolist() + corpus.val.to_numpy().tolist() == stream


def test_val_percent_zero(tmp_path, tokenizer):
    documents = make_docs(40)
    path = write_docs(tmp_path / "a.txt", documents)
    for split in ("document", "tail"):
        corpus = prepare_pretraining_data([path], tokenizer, val_percent=0, split=split,
                                          cache_dir=tmp_path / "cache")
        assert len(corpus.val) == 0
        assert corpus.val.to_numpy().size == 0
        assert corpus.train.to_numpy().tolist() == expected_stream(tokenizer, documents)
        assert corpus.manifest["split"] == split


def test_small_shards_and_windows_across_boundaries(tmp_path, tokenizer):
    documents = make_docs(60)
    path = write_docs(tmp_path / "a.txt", documents)
    corpus = prepare_pretraining_data([path], tokenizer, val_percent=20, shard_tokens=100,
                                      cache_dir=tmp_path / "cache")
    shards = corpus.manifest["shards"]
    stream = expected_stream(tokenizer, documents)
    assert len(shards) == -(-len(stream) // 100) >= 5
    assert all(s["tokens"] == 100 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 100
    files = sorted(p.name for p in corpus.path.glob("tokens-*.bin"))
    assert files == [s["file"] for s in shards]
    on_disk = np.concatenate([np.fromfile(corpus.path / f, dtype=np.uint16) for f in files])
    assert on_disk.tolist() == stream
    # the splits partition the documents, and windows read across shard and segment boundaries
    train_docs = split_documents(tokenizer, corpus.train.to_numpy())
    val_docs = split_documents(tokenizer, corpus.val.to_numpy())
    assert val_docs and sorted(train_docs + val_docs) == sorted(documents)
    for array in (corpus.train, corpus.val):
        flat = array.to_numpy().astype(np.int64)
        for start in range(0, len(array) - 1, 37):
            for length in (1, 99, 101, 250):
                if start + length <= len(array):
                    assert array.window(start, length).tolist() == flat[
                        start:start + length].tolist()
    whole = corpus.train.window(0, len(corpus.train))
    assert whole.dtype == torch.int64
    assert whole.tolist() == corpus.train.to_numpy().tolist()
    # the same layout after reopening from the cache
    again = prepare_pretraining_data([path], tokenizer, val_percent=20, shard_tokens=100,
                                     cache_dir=tmp_path / "cache")
    assert again.cached and again.train.window(95, 110).tolist() == corpus.train.window(
        95, 110).tolist()


def test_failed_build_leaves_nothing_in_the_cache(tmp_path, tokenizer):
    good = write_docs(tmp_path / "good.txt", make_docs(20))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine start " + "caf\xe9".encode("latin-1"))
    cache = tmp_path / "cache"
    with pytest.raises(LargeForgeError, match="not valid UTF-8"):
        prepare_pretraining_data([good, bad], tokenizer, cache_dir=cache)
    assert entries(cache) == []
    # and nothing stale blocks a later, good build
    bad.write_text("fine start café", encoding="utf-8")
    corpus = prepare_pretraining_data([good, bad], tokenizer, cache_dir=cache)
    assert not corpus.cached and entries(cache) == [corpus.path.name]


def test_no_document_at_all(tmp_path, tokenizer):
    path = tmp_path / "blank.txt"
    path.write_text(f"  {SEP}\n{SEP}  ", encoding="utf-8")
    cache = tmp_path / "cache"
    with pytest.raises(LargeForgeError, match="no non-empty document"):
        prepare_pretraining_data([path], tokenizer, cache_dir=cache)
    assert entries(cache) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"split": "random"}, "data.split must be one of"),
     ({"val_percent": 100}, r"data.val_percent must be in \[0, 100\)"),
     ({"val_percent": -1}, "data.val_percent")],
)
def test_bad_options(tmp_path, tokenizer, kwargs, message):
    path = write_docs(tmp_path / "a.txt", ["text"])
    with pytest.raises(LargeForgeError, match=message):
        prepare_pretraining_data([path], tokenizer, cache_dir=tmp_path / "cache", **kwargs)
    assert entries(tmp_path / "cache") == []


class _HugeVocabTokenizer:
    """A stand-in with more than 65,536 tokens: ids must be stored as uint32."""

    eos_token_id, bos_token_id, pad_token_id = 70_000, 69_999, 69_998

    def __len__(self):
        return 70_001

    def get_vocab(self):
        return {f"t{i}": i for i in range(5)}

    def __call__(self, batch, add_special_tokens=False, split_special_tokens=False):
        return {"input_ids": [[66_000 + ord(c) for c in text] for text in batch]}


def test_large_vocabulary_uses_uint32(tmp_path):
    path = write_docs(tmp_path / "a.txt", ["ab", "c"])
    corpus = prepare_pretraining_data([path], _HugeVocabTokenizer(), val_percent=0,
                                      cache_dir=tmp_path / "cache")
    assert corpus.manifest["dtype"] == "uint32"
    assert corpus.train.to_numpy().tolist() == [66_097, 66_098, 70_000, 66_099, 70_000]


def test_token_array_basics():
    a = np.arange(0, 5, dtype=np.uint16)
    b = np.arange(5, 12, dtype=np.uint16)
    array = TokenArray([a, np.empty(0, dtype=np.uint16), b])
    assert len(array) == 12
    assert array.window(3, 5).tolist() == [3, 4, 5, 6, 7]
    assert array.window(0, 12).tolist() == list(range(12))
    assert array.window(11, 1).tolist() == [11]
    assert array.window(12, 0).tolist() == []
    for start, length in ((-1, 2), (11, 2), (0, 13)):
        with pytest.raises(IndexError):
            array.window(start, length)
    empty = TokenArray([])
    assert len(empty) == 0 and empty.to_numpy().size == 0


def test_special_token_strings_in_documents_stay_text(tmp_path, tokenizer):
    documents = ["a story that quotes </s> and <s> and <pad> as text", "second story"]
    path = write_docs(tmp_path / "a.txt", documents)
    corpus = prepare_pretraining_data([path], tokenizer, val_percent=0,
                                      cache_dir=tmp_path / "cache")
    ids = corpus.train.to_numpy().tolist()
    specials = [(i, t) for i, t in enumerate(ids) if t < 4]
    eos = tokenizer.eos_token_id
    first_len = len(tokenizer(documents[0], add_special_tokens=False,
                              split_special_tokens=True)["input_ids"])
    assert specials == [(first_len, eos), (len(ids) - 1, eos)]
    assert tokenizer.decode(ids[:first_len]) == documents[0]
