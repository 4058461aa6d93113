"""The kinds of training data, one table row each: how a kind is loaded, which texts train a new
tokenizer, how it is tokenised, how it is batched, and the next-token loss it trains.

The trainer never branches on the kind: a new kind is a `DataKind` row and its functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from largeforge.config import Recipe
from largeforge.training.objectives import Objective, causal_lm_loss, instruction_loss
from largeforge.training.setup import default_template

Say = Callable[..., None]


@dataclass
class LoadedData:
    """A kind's records, read and checked before anything is written."""

    fmt: str = ""
    records: list[Any] = field(default_factory=list)  # conversations or preference pairs
    eval_records: list[Any] = field(default_factory=list)
    sources: list[Any] = field(default_factory=list)  # pretraining text sources

    def conversations(self) -> list[Any]:
        """The conversations a tokenizer learns from (a pair: its prompt and chosen reply)."""
        if self.fmt == "preference":
            return [pair["prompt"] + pair["chosen"] for pair in self.records]
        return self.records


@dataclass(frozen=True)
class DataKind:
    name: str
    load: Callable[[Recipe, Say], LoadedData]
    texts: Callable[[LoadedData, Recipe], Iterable[str]]  # for training a tokenizer
    prepare: Callable[[LoadedData, Any, Recipe, Say], Any]  # -> a corpus with .summary()
    # (corpus, tokenizer, recipe) -> (training batches with a resumable position, eval batches)
    batches: Callable[[Any, Any, Recipe], tuple[Any, list[Any]]]
    lm_objective: Objective | None  # None: the kind trains only with a preference objective


# -- pretraining text --------------------------------------------------------------------------


def _load_text(recipe: Recipe, say: Say) -> LoadedData:
    from largeforge.data.sources import resolve_sources

    return LoadedData(sources=resolve_sources(recipe.data.train))


def _text_documents(data: LoadedData, recipe: Recipe) -> Iterable[str]:
    from largeforge.data.sources import iter_documents

    return iter_documents(data.sources, text_field=recipe.data.text_field,
                          doc_separator=recipe.data.doc_separator)


def _prepare_text(data: LoadedData, tokenizer: Any, recipe: Recipe, say: Say) -> Any:
    from largeforge.data.pretrain import prepare_pretraining_data

    cfg = recipe.data
    return prepare_pretraining_data(
        data.sources, tokenizer, text_field=cfg.text_field, doc_separator=cfg.doc_separator,
        val_percent=cfg.val_percent, split=cfg.split, cache_dir=cfg.cache_dir,
        log=lambda text: say(text),
    )


def _text_batches(corpus: Any, tokenizer: Any, recipe: Recipe) -> tuple[Any, list[Any]]:
    from largeforge.data.loader import PretrainBatches, eval_batches

    cfg_d, cfg_t = recipe.data, recipe.train
    return (
        PretrainBatches(corpus.train, cfg_d.seq_len, cfg_t.batch_size, cfg_t.seed),
        eval_batches(corpus.val, cfg_d.seq_len, cfg_t.batch_size, cfg_t.eval_batches),
    )


# -- instruction and chat records --------------------------------------------------------------


def _load_instructions(recipe: Recipe, say: Say) -> LoadedData:
    from largeforge.data.instruct_data import load_conversations

    cfg = recipe.data
    fmt, records = load_conversations(cfg.train, cfg.format, text_field=cfg.text_field,
                                      cache_dir=cfg.cache_dir)
    say(f"instruction data: {len(records):,} {fmt} conversations")
    data = LoadedData(fmt, records)
    if cfg.eval:
        _, data.eval_records = load_conversations(cfg.eval, cfg.format,
                                                  text_field=cfg.text_field,
                                                  cache_dir=cfg.cache_dir)
        say(f"eval data: {len(data.eval_records):,} conversations from {len(cfg.eval)} "
            "source(s)")
    return data


def _conversation_texts(data: LoadedData, recipe: Recipe) -> Iterable[str]:
    from largeforge.data.instruct_data import conversation_texts

    return conversation_texts(data.conversations())


def _template(data: LoadedData, tokenizer: Any, recipe: Recipe) -> str | None:
    return recipe.data.chat_template or default_template(recipe, data.fmt, tokenizer)


def _prepare_instructions(data: LoadedData, tokenizer: Any, recipe: Recipe, say: Say) -> Any:
    from largeforge.data.instruct_data import prepare_instruction_data

    cfg = recipe.data
    template = _template(data, tokenizer, recipe)

    def prepare(records: list[Any], val_percent: float) -> Any:
        return prepare_instruction_data(
            data.fmt, records, tokenizer, seq_len=cfg.seq_len, chat_template=template,
            train_on_prompt=cfg.train_on_prompt, overlong=cfg.overlong, val_percent=val_percent,
        )

    corpus = prepare(data.records, 0.0 if cfg.eval else cfg.val_percent)
    if data.eval_records:
        corpus.val = prepare(data.eval_records, 0.0).train
    # Saved with every checkpoint, best/ and final/: generate, chat, serving and exports use
    # the template the model was trained with.
    tokenizer.chat_template = corpus.template
    return corpus


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        tokenizer.eos_token_id)


def _instruction_batches(corpus: Any, tokenizer: Any, recipe: Recipe) -> tuple[Any, list[Any]]:
    from largeforge.data.instruct_batches import PackedBatches, PaddedBatches

    cfg_d, cfg_t = recipe.data, recipe.train
    pad = pad_id(tokenizer)
    train: Any = (
        PackedBatches(corpus.train, cfg_d.seq_len, cfg_t.batch_size, cfg_t.seed, pad_id=pad)
        if cfg_d.packing else PaddedBatches(corpus.train, cfg_t.batch_size, cfg_t.seed, pad_id=pad)
    )
    val: list[Any] = []
    if corpus.val:
        fixed = PaddedBatches(corpus.val, cfg_t.batch_size, 0, pad_id=pad, group_by_length=False)
        val = [fixed.next_batch() for _ in range(min(cfg_t.eval_batches, len(fixed)))]
    return train, val


# -- preference pairs --------------------------------------------------------------------------


def _load_preferences(recipe: Recipe, say: Say) -> LoadedData:
    from largeforge.data.preference_data import load_preferences

    cfg = recipe.data
    data = LoadedData("preference", load_preferences(cfg.train, cache_dir=cfg.cache_dir))
    if cfg.eval:
        data.eval_records = load_preferences(cfg.eval, cache_dir=cfg.cache_dir)
    say(f"preference data: {len(data.records):,} pairs"
        + (f", {len(data.eval_records):,} to evaluate on" if cfg.eval else ""))
    return data


def _prepare_preferences(data: LoadedData, tokenizer: Any, recipe: Recipe, say: Say) -> Any:
    from largeforge.data.preference_data import prepare_preference_data

    cfg = recipe.data
    template = _template(data, tokenizer, recipe)
    corpus = prepare_preference_data(data.records, tokenizer, seq_len=cfg.seq_len,
                                     chat_template=template,
                                     val_percent=0.0 if cfg.eval else cfg.val_percent)
    if data.eval_records:
        corpus.val = prepare_preference_data(data.eval_records, tokenizer, seq_len=cfg.seq_len,
                                             chat_template=template, val_percent=0.0).train
    tokenizer.chat_template = corpus.template
    return corpus


def _preference_batches(corpus: Any, tokenizer: Any, recipe: Recipe) -> tuple[Any, list[Any]]:
    from largeforge.data.preference_data import PreferenceBatches, eval_pair_batches

    cfg_t = recipe.train
    pad = pad_id(tokenizer)
    return (PreferenceBatches(corpus.train, cfg_t.batch_size, cfg_t.seed, pad_id=pad),
            eval_pair_batches(corpus.val, cfg_t.batch_size, cfg_t.eval_batches, pad))


DATA_KINDS: dict[str, DataKind] = {
    kind.name: kind for kind in (
        DataKind("pretrain", _load_text, _text_documents, _prepare_text, _text_batches,
                 causal_lm_loss),
        DataKind("instruction", _load_instructions, _conversation_texts, _prepare_instructions,
                 _instruction_batches, instruction_loss),
        DataKind("preference", _load_preferences, _conversation_texts, _prepare_preferences,
                 _preference_batches, None),
    )
}
