"""Tokenizers for GGUF export, written as llama.cpp reads them.

Two kinds of `tokenizers` BPE can be written so that llama.cpp splits text into the same ids:

- Byte-level BPE, as llama.cpp's "gpt2" model: tokens, types and merges, plus the name of the
  pre-tokenizer (`tokenizer.ggml.pre`), since llama.cpp hard-codes each pre-tokenizer's regexes
  by name: "gpt-2" (GPT-2's regex, as LargeForge's own tokenizers use), "llama-bpe" (Llama 3),
  "qwen2" (Qwen2 and Qwen3) and "smollm" (digits split one by one, then GPT-2's regex).
- SentencePiece-style BPE with byte fallback (TinyLlama, Llama 2, Mistral v0.1), as llama.cpp's
  "llama" model: tokens with scores and types (NORMAL, CONTROL, UNKNOWN, USER_DEFINED and BYTE
  for the `<0xNN>` tokens). llama.cpp merges the highest-scoring pair first, where `tokenizers`
  applies the lowest-ranked merge; the two agree when the merges are SentencePiece's (every
  split of a piece into two pieces is a merge, ranked by the piece), so that is checked, and
  each piece's score is minus the rank of its first merge. llama.cpp puts a space in front of
  the text and writes spaces as "▁"; the tokenizer's normaliser and pre-tokenizer are probed to
  do the same. (transformers 5 loads Llama tokenizers with a Metaspace pre-tokenizer that
  skips that space when the text already starts with one, unlike SentencePiece: llama.cpp
  follows SentencePiece there.)

Anything else is an error that says what is supported: a GGUF that tokenises differently would
be wrong in silence.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from largeforge.errors import LargeForgeError

# Pre-tokenizer regexes llama.cpp knows, by the name `tokenizer.ggml.pre` gives them, with the
# `ignore_merges` setting llama.cpp assumes for each.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
SPLIT_REGEXES: dict[str, tuple[str, bool]] = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": ("qwen2", False),
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": ("llama-bpe", True),
    GPT2_REGEX: ("gpt-2", False),
}
SUPPORTED = (
    "byte-level BPE tokenizers with the GPT-2 (as `largeforge tokenizer train` writes), "
    "Llama 3, Qwen2/Qwen3 or SmolLM pre-tokenizer, and SentencePiece-style BPE tokenizers "
    "with byte fallback (TinyLlama, Llama 2, Mistral v0.1)"
)
SPACE = "\u2581"  # SentencePiece's "▁"
BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
# Texts whose normalised form shows what a SentencePiece-style tokenizer does to text: llama.cpp
# puts a space in front (or not) and writes every space as "▁", and changes nothing else.
SPM_PROBES = ("a b", "hello  world ", "x\ty\nz\r\n", "café 日本 🙂", "ﬁ Ａ ½ é")


@dataclass
class Vocab:
    """The tokenizer as llama.cpp stores it: model "gpt2" (byte-level BPE with merges) or
    "llama" (SentencePiece-style, with scores)."""

    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)
    chat_template: str | None = None
    model: str = "gpt2"
    scores: list[float] | None = None
    add_space_prefix: bool = False


def unsupported_tokenizer(why: str) -> LargeForgeError:
    return LargeForgeError(f"GGUF export supports {SUPPORTED}; this tokenizer {why}")


def _byte_level(part: dict[str, Any], use_regex: bool) -> bool:
    return part.get("type") == "ByteLevel" and not part.get("add_prefix_space") \
        and bool(part.get("use_regex", True)) == use_regex


def pre_tokenizer_name(pre: dict[str, Any] | None) -> tuple[str, bool]:
    """llama.cpp's name for a byte-level `tokenizers` pre-tokenizer (and the ignore_merges it
    implies)."""
    if pre is None:
        raise unsupported_tokenizer("has no pre-tokenizer")
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise unsupported_tokenizer("adds a prefix space (ByteLevel add_prefix_space)")
        if not pre.get("use_regex", True):
            raise unsupported_tokenizer("has a ByteLevel pre-tokenizer without its regex")
        return SPLIT_REGEXES[GPT2_REGEX]
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if parts and len(parts) == 1 and _byte_level(parts[0], use_regex=True):
        return SPLIT_REGEXES[GPT2_REGEX]
    if parts and len(parts) == 2 and parts[0].get("type") == "Digits" \
            and parts[0].get("individual_digits") and _byte_level(parts[1], use_regex=True):
        return "smollm", False  # llama.cpp: "\p{N}", then GPT-2's regex
    if parts and len(parts) == 2 and parts[0].get("type") == "Split" \
            and _byte_level(parts[1], use_regex=False):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex in SPLIT_REGEXES and parts[0].get("behavior") == "Isolated" \
                and not parts[0].get("invert"):
            return SPLIT_REGEXES[regex]
        raise unsupported_tokenizer(f"splits with a regex llama.cpp does not know: {regex!r}")
    raise unsupported_tokenizer(f"has the pre-tokenizer {json.dumps(pre)[:200]}")


def read_vocab(tokenizer: Any, vocab_size: int) -> Vocab:
    """Tokens, types, merges or scores, special ids and chat template of a fast BPE
    tokenizer, padded to the model's `vocab_size` with unused tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise unsupported_tokenizer("is not a fast (`tokenizers`) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise unsupported_tokenizer(f"is a {model.get('type')} model, not BPE")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise unsupported_tokenizer("uses subword prefixes or suffixes")
    size = len(tokenizer)
    if size > vocab_size:
        raise LargeForgeError(
            f"the tokenizer has {size} tokens but the model's vocabulary is {vocab_size}"
        )
    tokens = [str(t) for t in tokenizer.convert_ids_to_tokens(list(range(size)))]
    if model.get("byte_fallback"):
        vocab = _sentencepiece_vocab(tokenizer, backend, spec, tokens)
    else:
        vocab = _byte_level_vocab(tokenizer, spec, tokens)
    _pad(vocab, vocab_size)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            vocab.special_ids[kind] = int(token_id)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    vocab.chat_template = template or None
    return vocab


def _pad(vocab: Vocab, vocab_size: int) -> None:
    """Model rows past the tokenizer: unused tokens, never produced."""
    from gguf import TokenType

    for i in range(len(vocab.tokens), vocab_size):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(int(TokenType.UNUSED))
        if vocab.scores is not None:
            vocab.scores.append(-1e9)


def _added(spec: dict[str, Any]) -> dict[int, bool]:
    """Added token id -> whether it is special."""
    return {t["id"]: bool(t.get("special")) for t in spec.get("added_tokens", [])}


def _byte_level_vocab(tokenizer: Any, spec: dict[str, Any], tokens: list[str]) -> Vocab:
    from gguf import TokenType

    model = spec["model"]
    normalizer = spec.get("normalizer")
    # NFC (as Qwen2's tokenizer has) is left out, as llama.cpp's converter does: it changes
    # only text that is not already NFC, which is rare in practice.
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise unsupported_tokenizer(f"has a normalizer ({normalizer.get('type')})")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise unsupported_tokenizer("does not decode as byte-level")
    pre, ignore_merges = pre_tokenizer_name(spec.get("pre_tokenizer"))
    if bool(model.get("ignore_merges", False)) != ignore_merges:
        raise unsupported_tokenizer(
            f"sets ignore_merges={model.get('ignore_merges')} where llama.cpp's {pre!r} "
            f"pre-tokenizer assumes {ignore_merges}"
        )
    added = _added(spec)
    types = [
        int(TokenType.CONTROL if added[i] else TokenType.USER_DEFINED) if i in added
        else int(TokenType.NORMAL)
        for i in range(len(tokens))
    ]
    merges = []
    for merge in model.get("merges") or []:
        pair = merge.split(" ", 1) if isinstance(merge, str) else merge
        # llama.cpp splits merges at the space, so a space inside a part is written as U+0120
        # (what `gguf.SpecialVocab` does too); byte-level parts never hold one in practice.
        merges.append(" ".join(part.replace(" ", "\u0120") for part in pair))
    return Vocab(pre=pre, tokens=tokens, types=types, merges=merges)


# --- SentencePiece-style ------------------------------------------------------------------


def _normalised(backend: Any, text: str) -> list[str]:
    """`text` after the tokenizer's normaliser and pre-tokenizer, as the pieces it splits."""
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    if backend.pre_tokenizer is None:
        return [text]
    return [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)]


def _space_prefix(backend: Any) -> bool:
    """Whether the tokenizer puts "▁" in front of the text, checked to do to text exactly
    what llama.cpp's "llama" tokenizer does (spaces as "▁", nothing else changed)."""
    first = _normalised(backend, SPM_PROBES[0])
    if first not in ([SPACE + "a" + SPACE + "b"], ["a" + SPACE + "b"]):
        raise unsupported_tokenizer(
            f"normalises {SPM_PROBES[0]!r} to {first!r}, where llama.cpp's SentencePiece "
            f"tokenizer writes spaces as {SPACE!r}"
        )
    prefix = first[0].startswith(SPACE)
    for probe in SPM_PROBES[1:]:
        want = ((" " if prefix else "") + probe).replace(" ", SPACE)
        got = _normalised(backend, probe)
        if got != [want]:
            raise unsupported_tokenizer(
                f"normalises {probe!r} to {got!r}, where llama.cpp's SentencePiece tokenizer "
                f"gives {want!r} and splits nothing"
            )
    return prefix


def _merge_scores(merges: list[Any], vocab: dict[str, int], normal: set[str]) -> dict[str, int]:
    """Piece -> the rank of its first merge, after checking that the merges are
    SentencePiece's: each makes its two parts, every split of a piece into two normal pieces
    is one, and a piece's merges are ranked together."""
    first: dict[str, int] = {}
    pairs: set[tuple[str, str]] = set()
    previous = None
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        piece = left + right
        if piece not in vocab:
            raise unsupported_tokenizer(f"merges {left!r} + {right!r} into a missing token")
        if piece in first and piece != previous:
            raise unsupported_tokenizer(
                f"ranks the merges into {piece!r} apart, so llama.cpp's score-ordered "
                f"SentencePiece merging would differ"
            )
        first.setdefault(piece, rank)
        pairs.add((left, right))
        previous = piece
    for piece in normal:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal and (left, right) not in pairs:
                raise unsupported_tokenizer(
                    f"has no merge {left!r} + {right!r} for the token {piece!r}, which "
                    f"llama.cpp's SentencePiece tokenizer would make (its merges are not "
                    f"SentencePiece's)"
                )
    return first


def _sentencepiece_vocab(tokenizer: Any, backend: Any, spec: dict[str, Any],
                         tokens: list[str]) -> Vocab:
    from gguf import TokenType

    decoder = json.dumps(spec.get("decoder") or {}, ensure_ascii=False)
    if "ByteFallback" not in decoder or SPACE not in decoder:
        raise unsupported_tokenizer("has byte fallback but does not decode '▁' and <0xNN> tokens")
    add_space_prefix = _space_prefix(backend)
    model = spec["model"]
    vocab: dict[str, int] = model.get("vocab") or {}
    added = _added(spec)
    byte_ids = {i for t, i in vocab.items() if BYTE_TOKEN.fullmatch(t) and i not in added}
    if len(byte_ids) != 256:
        raise unsupported_tokenizer(
            f"has byte fallback with {len(byte_ids)} of the 256 <0xNN> tokens llama.cpp needs"
        )
    unk_id = getattr(tokenizer, "unk_token_id", None)
    normal = {t for t, i in vocab.items() if i not in added and i not in byte_ids
              and i != unk_id}
    first = _merge_scores(model.get("merges") or [], vocab, normal)
    types, scores = [], []
    for i, token in enumerate(tokens):
        if i == unk_id:
            kind = TokenType.UNKNOWN
        elif i in added:
            kind = TokenType.CONTROL if added[i] else TokenType.USER_DEFINED
        elif i in byte_ids:
            kind = TokenType.BYTE
        else:
            kind = TokenType.NORMAL
        types.append(int(kind))
        # llama.cpp merges the highest score first: minus the merge rank, and below every
        # merge for pieces no merge makes (single characters, whose score it never reads).
        score = -float(first.get(token, len(first) + i)) if kind == TokenType.NORMAL else 0.0
        scores.append(score)
    return Vocab(pre="default", tokens=tokens, types=types, merges=[], model="llama",
                 scores=scores, add_space_prefix=add_space_prefix)


# --- writing ------------------------------------------------------------------------------


NEVER_MERGE = "\u0120\u0120 \u0120\u0120"

# End-of-turn markers of the template families we know (ChatML, Llama 3, Phi-3, Gemma).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def add_vocab(writer: Any, vocab: Vocab, add_bos: bool, eos_id: int | None) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.model == "llama":
        writer.add_token_scores(vocab.scores or [0.0] * len(vocab.tokens))
        writer.add_add_space_prefix(vocab.add_space_prefix)
    else:
        # llama.cpp refuses a "gpt2" vocabulary without a merges key, and gguf-py writes no
        # empty array: a tokenizer without merges (one token per byte) gets one merge that can
        # never apply, since no symbol longer than one character ever forms without merges.
        writer.add_token_merges(vocab.merges or [NEVER_MERGE])
    ids = dict(vocab.special_ids)
    if eos_id is not None:
        ids["eos"] = eos_id
    for kind, token_id in ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    eot = end_of_turn_id(vocab)
    if eot is not None:
        writer.add_eot_token_id(eot)
    writer.add_add_bos_token(bool(add_bos))
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def end_of_turn_id(vocab: Vocab) -> int | None:
    """The id of the chat template's end-of-turn marker when it is one control token."""
    if not vocab.chat_template:
        return None
    from gguf import TokenType

    for marker in END_OF_TURN_TOKENS:
        if marker in vocab.chat_template and marker in vocab.tokens:
            token_id = vocab.tokens.index(marker)
            if vocab.types[token_id] == int(TokenType.CONTROL):
                return token_id
    return None
