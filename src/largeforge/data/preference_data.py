"""Preference pairs for DPO and ORPO: each record (a prompt, a chosen and a rejected completion,
as `formats.py` normalises them) rendered twice with the chat template, prompt + chosen and
prompt + rejected, with targets on the completion's assistant turns only; split train/val by a
stable hash; batched chosen-then-rejected, resumable to the exact batch."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from largeforge.chat_templates import get_template, render_batch_for_training
from largeforge.data.cleaning import in_eval_split, record_text
from largeforge.data.instruct_batches import (
    IGNORE_INDEX,
    EpochBatches,
    seeded_permutation,
)
from largeforge.errors import LargeForgeError

Sample = tuple[list[int], list[int]]
Pair = tuple[Sample, Sample]  # (chosen, rejected)


def load_preferences(
    paths: Sequence[str], *, cache_dir: str | os.PathLike[str] | None = None
) -> list[dict[str, Any]]:
    """Preference records as {"prompt": messages, "chosen": messages, "rejected": messages}."""
    from largeforge.data.formats import load_records

    loaded = load_records(list(paths), "preference", cache_dir=cache_dir)
    return [
        {"prompt": list(row["prompt"]), "chosen": list(row["chosen"]),
         "rejected": list(row["rejected"])}
        for row in loaded.dataset
    ]


@dataclass
class PreferenceCorpus:
    train: list[Pair]
    val: list[Pair]
    template: str
    records: int
    overlong: int = 0  # pairs with a side longer than seq_len (cut at the end)
    empty: int = 0  # pairs with a side left without targets, left out

    def summary(self) -> str:
        return (
            f"data: {self.records:,} preference pairs -> {len(self.train):,} train, "
            f"{len(self.val):,} val; {self.overlong:,} cut to seq_len, {self.empty:,} without "
            "targets left out"
        )


def _assistant_turns(messages: list[dict[str, str]]) -> int:
    return sum(1 for m in messages if m["role"] == "assistant")


def prepare_preference_data(
    records: list[dict[str, Any]],
    tokenizer: Any,
    *,
    seq_len: int,
    chat_template: str | None = None,
    val_percent: float = 10.0,
) -> PreferenceCorpus:
    """Render each pair; targets are the completion's assistant turns (not the prompt's)."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        chat_template = "chatml"
    template = get_template(chat_template, tokenizer)
    corpus = PreferenceCorpus([], [], template, len(records))
    for record in records:
        sides = []
        for key in ("chosen", "rejected"):
            turns = _assistant_turns(record[key])
            if turns == 0:
                raise LargeForgeError(f"a preference record's {key} completion has no assistant "
                                      "turn")
            ((ids, labels),) = render_batch_for_training(
                tokenizer, [record["prompt"] + record[key]], template, last_turns=turns
            )
            if len(ids) > seq_len:
                corpus.overlong += 1
                ids, labels = ids[:seq_len], labels[:seq_len]
            sides.append((ids, labels))
        if any(all(label == IGNORE_INDEX for label in labels[1:]) for _, labels in sides):
            corpus.empty += 1
            continue
        text = record_text({"messages": record["prompt"] + record["chosen"]})
        pair = (sides[0], sides[1])
        (corpus.val if in_eval_split(text, val_percent) else corpus.train).append(pair)
    if not corpus.train:
        raise LargeForgeError(
            "no preference pair left to train on: every pair lost its completion to seq_len; "
            "raise data.seq_len"
        )
    return corpus


class PreferenceBatches(EpochBatches):
    """`batch_size` pairs per batch, shuffled each epoch from `seed + epoch`: rows 0..B-1 hold the
    chosen sides, rows B..2B-1 the rejected ones, right-padded to the longest of all 2B."""

    def __init__(self, pairs: Sequence[Pair], batch_size: int, seed: int, *, pad_id: int) -> None:
        self.batch_size, self.pad_id = batch_size, pad_id
        super().__init__(pairs, seed)

    def _check(self, samples: Sequence[Any]) -> None:
        if not samples:
            raise LargeForgeError("no preference pairs to batch")

    def _plan(self, epoch: int) -> list[list[int]]:
        order = seeded_permutation(len(self.samples), self.seed + epoch)
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _collate(self, batch: list[int]) -> dict[str, torch.Tensor]:
        return collate_pairs([self.samples[i] for i in batch], self.pad_id)


def collate_pairs(pairs: Sequence[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen sides first, then rejected ones, padded together."""
    rows = [chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, lab) in enumerate(rows):
        input_ids[r, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        labels[r, :len(ids)] = torch.as_tensor(lab, dtype=torch.long)
        attention_mask[r, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def eval_pair_batches(pairs: Sequence[Pair], batch_size: int, max_batches: int,
                      pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Fixed evaluation batches, in order."""
    chunks = [pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size)]
    return [collate_pairs(chunk, pad_id) for chunk in chunks[:max_batches]]
