"""Byte-level BPE tokenizers, trained with Hugging Face `tokenizers` and saved as a
`PreTrainedTokenizerFast` directory that `transformers.AutoTokenizer` loads as it is."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from largeforge.errors import LargeForgeError

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]  # ids 0..3
# A byte-level BPE needs all 256 bytes plus the special tokens.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise LargeForgeError(
            f"vocab size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )


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
            yield text

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
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        tokenizer.save_pretrained(str(staging))
        if output.exists():
            output.rmdir()
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
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
    try:
        return AutoTokenizer.from_pretrained(str(location))
    except (OSError, ValueError) as error:
        if not location.exists() and isinstance(error, OSError):
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
