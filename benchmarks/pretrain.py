"""Pretraining throughput: `largeforge train` against a plain `transformers` training step.

Same model (the `small` preset: the stories15M shape, vocab 32000), same data (TinyStories
sample), seq 256, batch 8, fp32, in one run. MFU = training FLOPs per token (6 x matmul
parameters + attention) x tokens/s / the fp32 matmul peak measured here, now.

    python benchmarks/pretrain.py [--steps 40] [--compile]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from common import SHARED_DATA, median, print_table, write_result
from largeforge.config import load_recipe
from largeforge.data.loader import PretrainBatches
from largeforge.data.pretrain import TokenArray, prepare_pretraining_data
from largeforge.data.sources import iter_documents, resolve_sources
from largeforge.hardware import peak_fp32_flops
from largeforge.models import PRESETS, build_model, flops_per_token
from largeforge.tokenizer import train_tokenizer
from largeforge.training.loop import train

SEQ, BATCH = 256, 8


def plain_transformers_steps(
    tokens: TokenArray, vocab: int, steps: int, seed: int = 0
) -> list[float]:
    """The textbook loop: model(input_ids, labels=...) -> loss.backward() -> clip -> AdamW."""
    torch.manual_seed(seed)
    model = build_model(PRESETS["small"].model_copy(update={"vocab_size": vocab}))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.95), weight_decay=0.1)
    batches = PretrainBatches(tokens, SEQ, BATCH, seed)
    times = []
    for _ in range(steps):
        x, _ = batches.next_batch()
        start = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def largeforge_run(data: Path, tokenizer_dir: Path, out: Path, steps: int, compile_: bool) -> list[
    float
]:
    recipe = {
        "model": {"preset": "small", "vocab_size": PRESETS["small"].vocab_size},
        "tokenizer": {"path": str(tokenizer_dir)},
        "data": {"train": [str(data)], "seq_len": SEQ},
        "train": {"batch_size": BATCH, "max_steps": steps, "log_every": 1, "eval_every": 10**6,
                  "lr": 5e-4, "warmup_steps": 10, "compile": compile_, "precision": "fp32"},
        "output": {"dir": str(out), "name": "compile" if compile_ else "eager"},
    }
    train(load_recipe(recipe, environ={}), overwrite=True)
    run = out / recipe["output"]["name"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in records if "tokens_per_s" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the medians")
    parser.add_argument("--compile", action="store_true", help="also time train.compile=true")
    args = parser.parse_args()
    data = SHARED_DATA / "tinystories_sample.txt"
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        tok = train_tokenizer(iter_documents(resolve_sources([data])), 8192, tmp_path / "tok")
        corpus = prepare_pretraining_data([data], tok, cache_dir=tmp_path / "cache")
        vocab = PRESETS["small"].vocab_size
        with torch.device("meta"):
            flops = flops_per_token(build_model(PRESETS["small"]), SEQ)

        peak_before = peak_fp32_flops(torch.device("cpu"))
        plain_a = plain_transformers_steps(corpus.train, vocab, args.steps)[args.warmup :]
        ours = largeforge_run(data, tmp_path / "tok", tmp_path / "runs", args.steps, False)
        plain_b = plain_transformers_steps(corpus.train, vocab, args.steps)[args.warmup :]
        compiled = (
            largeforge_run(data, tmp_path / "tok", tmp_path / "runs", args.steps, True)
            if args.compile else []
        )
        peak_after = peak_fp32_flops(torch.device("cpu"))
    peak = max(peak_before, peak_after)
    tokens = SEQ * BATCH
    plain_tps = median([tokens / t for t in plain_a + plain_b])
    ours_tps = median(ours[args.warmup :])
    rows = [
        ["plain transformers step", f"{plain_tps:,.0f}", f"{100 * flops * plain_tps / peak:.1f}%",
         "1.00x"],
        ["largeforge train", f"{ours_tps:,.0f}", f"{100 * flops * ours_tps / peak:.1f}%",
         f"{ours_tps / plain_tps:.2f}x"],
    ]
    result = {
        "settings": {"preset": "small", "seq_len": SEQ, "batch_size": BATCH, "steps": args.steps,
                     "warmup_steps_left_out": args.warmup, "precision": "fp32",
                     "flops_per_token": flops},
        "peak_fp32_flops": peak,
        "plain_transformers": {"tokens_per_s": plain_tps, "mfu": flops * plain_tps / peak},
        "largeforge": {"tokens_per_s": ours_tps, "mfu": flops * ours_tps / peak,
                       "ratio_to_plain": ours_tps / plain_tps},
    }
    if compiled:
        comp_tps = median(compiled[args.warmup :])
        rows.append(["largeforge train (compile)", f"{comp_tps:,.0f}",
                     f"{100 * flops * comp_tps / peak:.1f}%", f"{comp_tps / plain_tps:.2f}x"])
        result["largeforge_compile"] = {"tokens_per_s": comp_tps, "mfu": flops * comp_tps / peak,
                                        "ratio_to_plain": comp_tps / plain_tps}
    print_table(
        f"pretraining, small preset (15.2M params), seq {SEQ}, batch {BATCH}, fp32; "
        f"peak fp32 matmul {peak / 1e9:.0f} GFLOP/s",
        ["loop", "tokens/s (median)", "MFU", "vs plain"], rows,
    )
    write_result("pretrain", result)


if __name__ == "__main__":
    main()
