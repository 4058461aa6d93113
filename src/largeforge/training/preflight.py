"""Before the first step: what `train --verify-only` checks, and the tokenizer a run uses (the
checkpoint's, the recipe's, the base model's, or one trained now)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from largeforge.chat_templates import get_template
from largeforge.config import Recipe
from largeforge.errors import LargeForgeError
from largeforge.hardware import detect_device
from largeforge.models import build_model, count_parameters, load_model
from largeforge.runs import TOKENIZER_DIR
from largeforge.tokenizer import check_vocab_size, load_tokenizer, train_tokenizer
from largeforge.training.data_kinds import LoadedData
from largeforge.training.distributed import Distributed
from largeforge.training.resources import check_batch_fits, check_new_model_fits
from largeforge.training.setup import default_template
from largeforge.training.state import TrainResult
from largeforge.training.steps import check_seq_len, model_shape

Say = Callable[..., None]


def verify(recipe: Recipe, data: LoadedData, run_dir: Path, say: Say) -> TrainResult:
    """Everything `train` would check before its first step, without training."""
    _describe_data(recipe, data, say)
    if recipe.tokenizer.path or recipe.model.from_pretrained:
        from largeforge.runs import resolve_model_dir

        source = recipe.tokenizer.path or resolve_model_dir(str(recipe.model.from_pretrained))
        tokenizer = load_tokenizer(source)
        vocab = len(tokenizer)
        say(f"tokenizer: {source}, {vocab} tokens")
        if data.records and not recipe.data.chat_template:
            default_template(recipe, data.fmt, tokenizer)
    if data.records and recipe.data.chat_template:
        get_template(recipe.data.chat_template)  # a built-in name or a Jinja file
    else:
        vocab = recipe.tokenizer.vocab_size
        check_vocab_size(vocab)
        say(f"tokenizer: will train a {vocab}-token byte-level BPE")
    device = detect_device(recipe.train.device)
    if recipe.model.from_pretrained:
        model = load_model(recipe.model.from_pretrained)
        if recipe.train.method != "full":
            from largeforge.training.lora import check_target_modules

            check_target_modules(model, list(recipe.lora.target_modules))
    else:
        shape = recipe.model.resolve(vocab)
        check_new_model_fits(shape, device)
        with torch.device("meta"):
            model = build_model(shape)
    check_seq_len(recipe.data.seq_len, model.config.max_position_embeddings)
    check_batch_fits(recipe.train.batch_size, recipe.data.seq_len, model.config.hidden_size,
                     model.config.num_hidden_layers, device)
    counts = count_parameters(model)
    say(f"model: {counts['total'] / 1e6:.2f}M parameters, {model_shape(model)}")
    say(f"output: {run_dir} is free to use" if not run_dir.exists() else f"output: {run_dir} ok")
    say("[green]verified: ready to train[/]")
    return TrainResult(run_dir=run_dir, steps=0, parameters=counts["total"], verified_only=True)


def _describe_data(recipe: Recipe, data: LoadedData, say: Say) -> None:
    if not data.sources:
        from largeforge.data.instruct_data import conversation_texts

        conversations = data.conversations()
        n_chars = sum(len(text) for text in conversation_texts(conversations))
        say(f"data: {len(conversations):,} conversations, {n_chars:,} characters")
        return
    from largeforge.data.sources import iter_documents

    stats: dict[str, int] = {}
    n_chars = 0
    for text in iter_documents(
        data.sources, text_field=recipe.data.text_field,
        doc_separator=recipe.data.doc_separator, stats=stats,
    ):
        n_chars += len(text)
    if stats.get("documents", 0) == 0:
        raise LargeForgeError("the training data holds no non-empty document")
    say(f"data: {len(data.sources)} source(s), {stats['documents']:,} documents, "
        f"{n_chars:,} characters")


def tokenizer_for(
    recipe: Recipe, checkpoint: Path | None, texts: Callable[[], Iterable[str]], staging: Path,
    say: Say, d: Distributed | None = None,
) -> Any:
    """The checkpoint's tokenizer, the recipe's, the base model's, or one trained now (into
    `staging/tokenizer/`, moved into the run directory once the run is claimed). With several
    processes, rank 0 trains it and the others load it from rank 0's staging directory."""
    if checkpoint is not None:
        return load_tokenizer(checkpoint)
    if recipe.tokenizer.path:
        return load_tokenizer(recipe.tokenizer.path)
    if recipe.model.from_pretrained:
        from largeforge.runs import resolve_model_dir

        return load_tokenizer(resolve_model_dir(recipe.model.from_pretrained))
    d = d or Distributed()

    def train_here() -> Any:
        say(f"training a {recipe.tokenizer.vocab_size}-token byte-level BPE tokenizer ...")
        started = time.perf_counter()
        trained = train_tokenizer(
            texts(),
            recipe.tokenizer.vocab_size,
            staging / TOKENIZER_DIR,
            min_frequency=recipe.tokenizer.min_frequency,
        )
        say(f"tokenizer: {len(trained)} tokens in {time.perf_counter() - started:.1f}s")
        return trained

    tokenizer = d.on_main(train_here)
    where = d.broadcast(str(staging / TOKENIZER_DIR))
    return tokenizer if d.is_main else load_tokenizer(where)
