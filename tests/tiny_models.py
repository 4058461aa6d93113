"""Tiny tokenizers and random models for inference tests, built in memory from configs."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from largeforge.models import ModelConfig, build_model


def make_tokenizer(texts: list[str], *extra_special: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE with <pad>, <unk>, <s>, </s> as ids 0..3, trained on a few lines."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        special_tokens=["<pad>", "<unk>", "<s>", "</s>", *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts * 10, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )


def make_model(vocab_size: int, max_seq_len: int) -> torch.nn.Module:
    """A random 2-layer Llama whose EOS is id 3."""
    torch.manual_seed(0)
    config = ModelConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=vocab_size,
        max_seq_len=max_seq_len,
    )
    # A wider init than training uses, so a random model's greedy output is not one token
    # repeated, which would make parity tests weak.
    model = build_model(config, initializer_range=0.3)
    model.generation_config.eos_token_id = 3
    model.config.eos_token_id = 3
    return model.eval()


# One tiny config per model family that `train sft` must handle: every architecture detail
# that matters to LoRA (fused qkv in Phi-3, Conv1D in GPT-2, q/k norms in Qwen3, partial rotary
# in Phi, tied embeddings in Gemma) is kept; only the sizes are small.
_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(_SIZES)),
    "mistral": ("MistralConfig", dict(_SIZES, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(_SIZES)),
    "qwen3": ("Qwen3Config", dict(_SIZES, head_dim=16)),
    "phi": ("PhiConfig", dict(_SIZES, partial_rotary_factor=0.5)),
    "phi3": ("Phi3Config", dict(_SIZES)),
    "gemma": ("GemmaConfig", dict(_SIZES, head_dim=16)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
}


def make_family_model(family: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0):
    """A random tiny model of `family` whose vocabulary and special ids fit `tokenizer`."""
    import transformers

    class_name, sizes = FAMILIES[family]
    config = getattr(transformers, class_name)(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sizes,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def make_split_regex_tokenizer(texts: list[str], regex: str, ignore_merges: bool = False,
                               vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE with a Split(regex) pre-tokenizer, as Qwen2/3 and Llama 3 ship them;
    <pad>, <unk>, <s>, </s> are ids 0..3."""
    from tokenizers import Regex

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def train_sentencepiece(texts: list[str], vocab_size: int = 600, add_dummy_prefix: bool = True):
    """A SentencePiece BPE model with byte fallback, as Llama 2 / TinyLlama / Mistral v0.1 ship
    (<unk>, <s>, </s> are ids 0..2, then the 256 <0xNN> tokens), as a SentencePieceProcessor.
    Needs the `sentencepiece` package (the `test` extra)."""
    import io

    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buffer, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
        add_dummy_prefix=add_dummy_prefix, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2, num_threads=1,
    )
    return spm.SentencePieceProcessor(model_proto=buffer.getvalue())


def sentencepiece_vocab_and_merges(sp) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and the BPE merges of a SentencePiece BPE model, as transformers'
    converter makes them: every split of a normal piece into two normal pieces, ranked by the
    piece's score."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    normal = {sp.id_to_piece(i): (sp.get_score(i), i) for i in range(sp.get_piece_size())
              if not (sp.is_unknown(i) or sp.is_control(i) or sp.is_byte(i)
                      or sp.is_unused(i))}
    ranked = sorted(
        (-score, i, piece[:cut], piece[cut:])
        for piece, (score, i) in normal.items() for cut in range(1, len(piece))
        if piece[:cut] in normal and piece[cut:] in normal
    )
    return vocab, [(left, right) for _, _, left, right in ranked]


def make_sentencepiece_tokenizer(sp, *, metaspace: bool = False,
                                 add_prefix: bool = True) -> PreTrainedTokenizerFast:
    """The fast tokenizer of a SentencePiece BPE model `sp`: with `metaspace`, what
    transformers 5's `LlamaTokenizer` builds (a Metaspace pre-tokenizer); otherwise the legacy
    Llama 2 / TinyLlama tokenizer.json (Prepend("▁") + Replace(" ", "▁") normaliser; without
    `add_prefix`, Gemma's: Replace only)."""
    from tokenizers import normalizers
    from transformers import LlamaTokenizer

    vocab, merges = sentencepiece_vocab_and_merges(sp)
    if metaspace:
        return LlamaTokenizer(vocab=vocab, merges=merges, legacy=False)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True,
                               byte_fallback=True))
    steps = [normalizers.Prepend("\u2581")] if add_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    strip = [decoders.Strip(" ", 1, 0)] if add_prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), *strip])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
