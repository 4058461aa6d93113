"""Character-level Tiny Shakespeare: nanoGPT's CPU "baby GPT" setting, with our Llama.

dim 128, 4 layers, 4 heads, block 64, batch 12, 2,000 iterations, no dropout, lr 1e-3 decaying
to 1e-4, beta2 0.99, warmup 100 (nanoGPT's config/train_shakespeare_char.py with its README's
CPU overrides; nanoGPT reports val loss 1.88 there). Our vocabulary is the 256 bytes (+4
specials): on this ASCII text one token is one character, so losses are per character, as
nanoGPT's. Validation is the last 10% of the text, as in nanoGPT's prepare.py, and the final
val loss here is over the whole validation set.

    python benchmarks/shakespeare_char.py [--iters 2000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from common import SHARED_DATA, print_table, write_result
from largeforge.config import load_recipe
from largeforge.training.loop import train

NANOGPT_VAL_LOSS = 1.88


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=2000)
    args = parser.parse_args()
    recipe = {
        "model": {"preset": "tiny", "dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4,
                  "max_seq_len": 64, "tie_embeddings": True, "dropout": 0.0},
        "tokenizer": {"vocab_size": 260},
        "data": {"train": [str(SHARED_DATA / "tinyshakespeare.txt")], "split": "tail",
                 "val_percent": 10.0, "seq_len": 64},
        "train": {"batch_size": 12, "max_steps": args.iters, "lr": 1e-3, "min_lr": 1e-4,
                  "warmup_steps": 100, "beta2": 0.99, "weight_decay": 0.1, "grad_clip": 1.0,
                  "eval_every": 250, "eval_batches": 200, "log_every": 50},
        "output": {"name": "shakespeare-char"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        recipe["output"]["dir"] = tmp
        started = time.perf_counter()
        result = train(load_recipe(recipe, environ={}))
        wall = time.perf_counter() - started
        lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(x) for x in lines]
    evals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    final = evals[-1][1]
    print_table(
        "char-level Tiny Shakespeare (nanoGPT baby-GPT CPU setting)",
        ["", "value"],
        [["parameters", f"{result.parameters:,}"], ["iterations", args.iters],
         ["final val loss", f"{final:.4f}"], ["best val loss", f"{result.best_val_loss:.4f}"],
         ["nanoGPT reports", NANOGPT_VAL_LOSS], ["target met (<= 1.88)", final <= 1.88],
         ["precision", result.precision], ["wall time", f"{wall:.0f} s"],
         ["median tokens/s", f"{result.tokens_per_s:,.0f}"]],
    )
    write_result("shakespeare_char", {
        "settings": recipe, "final_val_loss": final, "best_val_loss": result.best_val_loss,
        "val_curve": evals, "nanogpt_val_loss": NANOGPT_VAL_LOSS, "target_met": final <= 1.88,
        "wall_time_s": wall, "precision": result.precision,
        "median_tokens_per_s": result.tokens_per_s,
        "parameters": result.parameters,
    })


if __name__ == "__main__":
    main()
