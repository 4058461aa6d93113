"""Pretraining throughput: `largeforge train` against a plain `transformers` training step.

Same model (the `small` preset: the stories15M shape, vocab 32000), same data (TinyStories
sample), seq 256, batch 8, in one run, in fp32 and, where the timed probe finds bf16 fast on this
device, in bf16 autocast too (what `train.precision: auto` then picks). MFU = training FLOPs per
token (6 x matmul parameters + attention) x tokens/s / the matmul peak of that precision,
measured here, now (the larger of the readings before and after the loops).

    python benchmarks/pretrain.py [--steps 30] [--compile] [--precision fp32|bf16|both]
"""

from __future__ import annotations

import argparse
import contextlib
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
from largeforge.hardware import bf16_is_fast, matmul_flops, peak_fp32_flops
from largeforge.models import PRESETS, build_model, flops_per_token
from largeforge.tokenizer import train_tokenizer
from largeforge.training.loop import train

SEQ, BATCH = 256, 8
CPU = torch.device("cpu")


def peak(precision: str) -> float:
    if precision == "fp32":
        return peak_fp32_flops(CPU)
    return max(matmul_flops(CPU, torch.bfloat16, n=n) for n in (1024, 2048))


def plain_transformers_steps(
    tokens: TokenArray, steps: int, precision: str, seed: int = 0
) -> list[float]:
    """The textbook loop: model(input_ids, labels=...) -> loss.backward() -> clip -> AdamW."""
    torch.manual_seed(seed)
    model = build_model(PRESETS["small"])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.95), weight_decay=0.1)
    batches = PretrainBatches(tokens, SEQ, BATCH, seed)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
        else contextlib.nullcontext()
    )
    times = []
    for _ in range(steps):
        x, _ = batches.next_batch()
        start = time.perf_counter()
        with autocast:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def largeforge_run(
    data: Path, tokenizer_dir: Path, out: Path, steps: int, precision: str, compile_: bool
) -> list[float]:
    name = f"{precision}-{'compile' if compile_ else 'eager'}"
    recipe = {
        "model": {"preset": "small", "vocab_size": PRESETS["small"].vocab_size},
        "tokenizer": {"path": str(tokenizer_dir)},
        "data": {"train": [str(data)], "seq_len": SEQ},
        "train": {"batch_size": BATCH, "max_steps": steps, "log_every": 1, "eval_every": 10**6,
                  "lr": 5e-4, "warmup_steps": 10, "compile": compile_, "precision": precision},
        "output": {"dir": str(out), "name": name},
    }
    train(load_recipe(recipe, environ={}), overwrite=True)
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in records if "tokens_per_s" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the medians")
    parser.add_argument("--compile", action="store_true", help="also time train.compile=true")
    parser.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    args = parser.parse_args()
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    if args.precision == "both" and not bf16_is_fast(CPU):
        precisions = ["fp32"]  # bf16 is emulated here: hundreds of times slower, not worth timing
    data = SHARED_DATA / "tinystories_sample.txt"
    tokens = SEQ * BATCH
    with torch.device("meta"):
        flops = flops_per_token(build_model(PRESETS["small"]), SEQ)
    rows, result = [], {
        "settings": {"preset": "small", "seq_len": SEQ, "batch_size": BATCH, "steps": args.steps,
                     "warmup_steps_left_out": args.warmup, "flops_per_token": flops},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        tok = train_tokenizer(iter_documents(resolve_sources([data])), 8192, tmp_path / "tok")
        corpus = prepare_pretraining_data([data], tok, cache_dir=tmp_path / "cache")
        for precision in precisions:
            peak_before = peak(precision)
            plain_a = plain_transformers_steps(corpus.train, args.steps, precision)[args.warmup:]
            ours = largeforge_run(data, tmp_path / "tok", tmp_path / "runs", args.steps,
                                  precision, False)[args.warmup:]
            plain_b = plain_transformers_steps(corpus.train, args.steps, precision)[args.warmup:]
            compiled = largeforge_run(data, tmp_path / "tok", tmp_path / "runs", args.steps,
                                      precision, True)[args.warmup:] if args.compile else []
            top = max(peak_before, peak(precision))
            plain_tps = median([tokens / t for t in plain_a + plain_b])
            entry = {"peak_flops": top, "plain_transformers": {
                "tokens_per_s": plain_tps, "mfu": flops * plain_tps / top}}
            loops = [("largeforge train", "largeforge", ours)]
            if compiled:
                loops.append(("largeforge train (compile)", "largeforge_compile", compiled))
            rows.append([f"plain transformers step, {precision}", f"{plain_tps:,.0f}",
                         f"{100 * flops * plain_tps / top:.1f}%", f"{top / 1e9:.0f}", "1.00x"])
            for label, key, speeds in loops:
                tps = median(speeds)
                entry[key] = {"tokens_per_s": tps, "mfu": flops * tps / top,
                              "ratio_to_plain": tps / plain_tps}
                rows.append([f"{label}, {precision}", f"{tps:,.0f}",
                             f"{100 * flops * tps / top:.1f}%", f"{top / 1e9:.0f}",
                             f"{tps / plain_tps:.2f}x"])
            result[precision] = entry
    print_table(
        f"pretraining, small preset (15.2M params), seq {SEQ}, batch {BATCH}; "
        "MFU against the measured matmul peak of the same precision",
        ["loop", "tokens/s (median)", "MFU", "peak GFLOP/s", "vs plain"], rows,
    )
    write_result("pretrain", result)


if __name__ == "__main__":
    main()
