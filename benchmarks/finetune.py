"""Full fine-tuning vs LoRA vs QLoRA on the `base` preset (~110M parameters): tokens/s and peak
memory (RSS), same model, same data, in one run.

The base model is the `base` preset (dim 768, 12 layers, vocabulary 32,000), randomly
initialised and saved once; the data are the Alpaca sample rendered with chatml and packed into
sequences of 256 tokens, 4 per step. Each method runs in its own process, so its peak RSS
(`ru_maxrss`, loading included) is its own; a process that only imports torch, transformers and
peft and loads nothing is measured too, as the floor every method shares. Loading briefly holds
more than training does (transformers reads the fp32 checkpoint before QLoRA quantises it), so
the training RSS is reported too: the highest RSS sampled (every 20 ms) in the second half of
the run, when the optimizer state and activations are all allocated. Tokens/s is the loop's
median over its logging windows (the first left out). LoRA: r=8, alpha 16, all linear layers;
QLoRA: the same adapters over a 4-bit NF4 base (bitsandbytes, double quantisation). "weights" is
the model's own memory (`get_memory_footprint`: parameters and buffers): fp32 for full training,
a bf16 base for LoRA in bf16, 4-bit linear layers for QLoRA.

    python benchmarks/finetune.py [--steps 30] [--precision auto|fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import SHARED_DATA, print_table, write_result

METHODS = ("full", "lora", "qlora")
SEQ, BATCH = 256, 4


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class RssSampler:
    """Samples this process's RSS every `interval` seconds in a background thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * self._page / 2**20
            self.samples.append((time.perf_counter(), rss))
            time.sleep(interval)

    def __enter__(self) -> RssSampler:
        self.start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.end = time.perf_counter()
        self._stop.set()
        self._thread.join()

    def second_half_peak(self) -> float:
        middle = (self.start + self.end) / 2
        return max(rss for t, rss in self.samples if t >= middle)


def make_base(directory: Path) -> None:
    from largeforge.models import ModelConfig, build_model, preset
    from largeforge.tokenizer import train_tokenizer

    records = json.loads((SHARED_DATA / "alpaca_sample.json").read_text(encoding="utf-8"))
    texts = [" ".join(str(v) for v in r.values()) for r in records]
    tokenizer = train_tokenizer(texts, 4096, directory / "tokenizer")
    shape = preset("base").model_dump()
    shape.update(vocab_size=32000, max_seq_len=SEQ)  # stories110M's vocabulary
    model = build_model(ModelConfig(**shape), eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")


def run_one(method: str, base: Path, out: Path, steps: int, precision: str) -> dict:
    """In a child process: train and report tokens/s, trainable parameters and peak RSS."""
    if method == "floor":
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401

        return {"method": "floor", "peak_rss_mib": peak_rss_mib()}
    from largeforge.training.sft import SFTTrainer

    trainer = SFTTrainer(
        str(base / "model"), str(SHARED_DATA / "alpaca_sample.json"), output_dir=out / method,
        method=method, chat_template="chatml", max_steps=steps, batch_size=BATCH, seq_len=SEQ,
        precision=precision,
        overrides=["data.packing=true", "train.log_every=5", f"train.eval_every={steps}",
                   "train.eval_batches=2", "train.warmup_steps=2", "train.load_best_at_end=false"],
    )
    with RssSampler() as sampler:
        result = trainer.train()
    from largeforge.models import count_parameters

    counts = count_parameters(result.model)
    weights = result.model.get_memory_footprint() / 2**20  # parameters and buffers, adapters too
    return {"method": method, "tokens_per_s": result.tokens_per_s, "precision": result.precision,
            "weights_mib": weights,
            "trainable": counts["trainable"], "total": counts["total"],
            "peak_rss_mib": peak_rss_mib(), "training_rss_mib": sampler.second_half_peak(),
            "seconds": sampler.end - sampler.start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "BASE", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, base, out = args.child
        row = run_one(method, Path(base), Path(out), args.steps, args.precision)
        print("RESULT " + json.dumps(row))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_base(root / "base")
        for method in ("floor", *METHODS):
            proc = subprocess.run(
                [sys.executable, __file__, "--steps", str(args.steps), "--precision",
                 args.precision, "--child", method, str(root / "base"), str(root / "runs")],
                capture_output=True, text=True, check=False,
            )
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(lines[-1][len("RESULT "):]))
    by = {r["method"]: r for r in rows}
    floor = by["floor"]["peak_rss_mib"]
    table = []
    for method in METHODS:
        r = by[method]
        table.append([
            method, r["precision"], f"{r['trainable'] / 1e6:.2f}M", f"{r['weights_mib']:,.0f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['tokens_per_s'] / by['full']['tokens_per_s']:.2f}x",
            f"{r['peak_rss_mib']:,.0f}", f"{r['training_rss_mib']:,.0f}",
            f"{r['training_rss_mib'] - floor:,.0f}",
            f"{(r['training_rss_mib'] - floor) / (by['full']['training_rss_mib'] - floor):.2f}x",
        ])
    print_table(
        f"fine-tuning the base preset ({by['full']['total'] / 1e6:.0f}M parameters), "
        f"seq {SEQ} x batch {BATCH}, {args.steps} steps; floor RSS (imports only) {floor:,.0f} MiB",
        ["method", "precision", "trainable", "weights MiB", "tokens/s", "vs full", "peak RSS MiB",
         "training RSS", "above floor", "vs full"],
        table,
    )
    write_result("finetune", {"steps": args.steps, "seq_len": SEQ, "batch_size": BATCH,
                              "floor_rss_mib": floor, "rows": rows})


if __name__ == "__main__":
    main()
