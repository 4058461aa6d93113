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
