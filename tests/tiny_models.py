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
