"""A task with a checkable answer for fine-tuning tests: reply with the input words reversed."""

from __future__ import annotations

import random

WORDS = ("red", "blue", "green", "cat", "dog", "fish", "sun", "moon", "tree", "rock", "milk",
         "bread", "king", "queen", "ship", "star")
CHAT_SPECIALS = ("<|im_start|>", "<|im_end|>")


def reverse_task(n: int, seed: int) -> list[dict]:
    """`n` distinct messages records: the user gives 3-5 words, the assistant reverses them."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records = []
    while len(records) < n:
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 5))]
        prompt = " ".join(words)
        if prompt in seen:
            continue
        seen.add(prompt)
        records.append({"messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": " ".join(reversed(words))},
        ]})
    return records


def split_task(n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and held-out records with no prompt in common."""
    records = reverse_task(n_train + n_test, seed)
    return records[:n_train], records[n_train:]


def task_texts() -> list[str]:
    """Lines to train a tokenizer on, so each word is one token with and without a space."""
    return [" ".join(WORDS), " ".join(reversed(WORDS))] * 5
