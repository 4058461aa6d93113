"""Byte-level BPE tokenizers, trained with Hugging Face `tokenizers` and saved as a
`PreTrainedTokenizerFast` directory that `transformers.AutoTokenizer` loads as it is."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from largeforge.atomic_files import replace_path, temp_dir
from largeforge.config import MAX_VOCAB_SIZE
from largeforge.damaged_files import (
    HUB_CACHE_REMEDY,
    MODEL_REMEDY,
    TOKENIZER_REMEDY,
    check_tokenizer_files,
    hub_snapshot,
    tokenizer_json_problem,
)
from largeforge.errors import LargeForgeError

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]  # ids 0..3
# A byte-level BPE needs all 256 bytes plus the special tokens.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
# The BPE trainer holds a whole text (and its pre-tokenised words with offsets) at once: one
# 50 MB line took 4.5 GB. Texts are fed in pieces of at most this many characters, cut at a line
# break or a space, so memory follows the piece, not the file.
TEXT_PIECE_CHARS = 1 << 20


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise LargeForgeError(
            f"vocab size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    if vocab_size > MAX_VOCAB_SIZE:
        raise LargeForgeError(
            f"vocab size {vocab_size} is too large: at most {MAX_VOCAB_SIZE} (the largest "
            "released models use about 256000)"
        )


def text_pieces(text: str, limit: int = TEXT_PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of at most `limit` characters, each cut after its last line
    break, else before its last space, else at the limit (a text without spaces)."""
    start = 0
    while len(text) - start > limit:
        end = text.rfind("\n", start, start + limit) + 1
        if end <= start:
            end = text.rfind(" ", start + 1, start + limit)
        if end <= start:
            end = start + limit
        yield text[start:end]
        start = end
    yield text[start:]


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    output_dir: str | Path,
    *,
    min_frequency: int = 2,
    model_max_length: int | None = None,
) -> Any:
    """Train a byte-level BPE on `texts` (streamed) and save it to `output_dir` atomically.

    Returns the loaded `PreTrainedTokenizerFast`. Every byte is in the vocabulary, so no text is
    ever unknown; `<s>` is added at the start of encoded text only when asked for.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    check_vocab_size(vocab_size)
    output = Path(output_dir)
    if output.exists() and any(output.iterdir()):
        raise LargeForgeError(f"tokenizer output {output} already exists and is not empty")
    seen = {"documents": 0}

    def counted(stream: Iterable[str]) -> Iterator[str]:
        for text in stream:
            seen["documents"] += 1
            yield from text_pieces(text)

    core = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(counted(texts), trainer=trainer)
    if seen["documents"] == 0:
        raise LargeForgeError("no text to train the tokenizer on")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length or 1_000_000_000,
    )
    with temp_dir(output) as staging:  # a killed earlier write's staging is swept first
        tokenizer.save_pretrained(str(staging))
        if output.exists():
            output.rmdir()
        replace_path(staging, output)
    return load_tokenizer(output)


def load_tokenizer(path: str | Path) -> Any:
    """Load a tokenizer from a directory (ours or any Hugging Face one) or a hub id."""
    from transformers import AutoTokenizer

    from largeforge.runs import RunDir

    location = Path(str(path))
    run = RunDir(location)
    if location.is_dir() and not (location / "tokenizer_config.json").is_file() and (
        run.tokenizer.is_dir()
    ):
        location = run.tokenizer  # a run directory
    if location.is_dir():
        directory, remedy, config_remedy = location, TOKENIZER_REMEDY, MODEL_REMEDY
    else:  # a hub id: its files in the local cache, if they are there
        directory, remedy = hub_snapshot(str(path)), HUB_CACHE_REMEDY
        config_remedy = remedy
    if directory is not None:
        check_tokenizer_files(directory, remedy, config_remedy)
    try:
        return AutoTokenizer.from_pretrained(str(location))
    except Exception as error:
        damaged = tokenizer_json_problem(directory, remedy) if directory is not None else None
        if damaged is not None:  # what the library tripped over, named
            raise damaged from None
        if not isinstance(error, (OSError, ValueError)):
            raise
        if not location.exists():
            from largeforge.runs import not_cached_error

            raise not_cached_error(str(path)) from None  # a hub id, offline and not cached
        raise LargeForgeError(f"cannot load a tokenizer from {path}: {error}") from None


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the full tokenizer definition (vocabulary, merges, normalisation, specials)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
    else:  # a slow tokenizer: its vocabulary is what it is
        definition = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    specials = json.dumps(
        [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id], sort_keys=True
    )
    return hashlib.sha256((definition + specials).encode()).hexdigest()[:20]
