"""Peak memory (RSS) of training: full, LoRA and QLoRA fine-tuning of the `base` preset, and a
1B-shaped Llama pretraining with gradient checkpointing.

- `base` preset (110M parameters): the rows of `benchmarks/results/finetune.json`, which
  `finetune.py` measures (each method in its own process; `--run-finetune` runs it first).
- 1B shape: dim 2048, 16 layers, 16 heads, SwiGLU 5632, vocabulary 32,000 (tied), seq 256,
  batch 1, `train.gradient_checkpointing: true`, through `largeforge`'s own training loop
  (`training.loop.train`) on the TinyStories sample, in a process of its own. Its RSS is
  sampled every 20 ms; "training RSS" is the highest sample from the first logged step on (the
  optimizer state and activations all allocated), "peak RSS" is `ru_maxrss` (loading
  included). The run is stopped once `--steps` steps are logged, before the final evaluation
  and checkpoint: writing 10 GB of optimizer state is not what is measured here. Beside it, a
  process that only imports torch, transformers and the training loop gives the floor.

The expected size is arithmetic: fp32 weights, gradients and AdamW's two moments are 16 bytes a
parameter; what the measured training RSS holds above that and the floor is activations,
buffers and allocator slack.

    python benchmarks/memory.py [--steps 4] [--run-finetune] [--quick]
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

from common import RESULTS, SHARED_DATA, print_table, write_result

ONE_B = {"dim": 2048, "n_layers": 16, "n_heads": 16, "hidden_dim": 5632, "vocab_size": 32000,
         "max_seq_len": 256}
QUICK_SHAPE = {"dim": 256, "n_layers": 2, "n_heads": 4, "hidden_dim": 704, "vocab_size": 32000,
               "max_seq_len": 256}
SEQ, BATCH = 256, 1
MIB = 2**20


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def available_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def parameters_of(shape: dict) -> int:
    d, layers, ffn, vocab = shape["dim"], shape["n_layers"], shape["hidden_dim"], \
        shape["vocab_size"]
    per_layer = 4 * d * d + 3 * d * ffn + 2 * d  # attention, SwiGLU, two RMSNorms
    return layers * per_layer + vocab * d + d  # tied embedding / head, final norm


def child_floor() -> dict:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import largeforge.training.loop  # noqa: F401

    return {"what": "floor", "peak_rss_mib": peak_rss_mib()}


def child_train(shape: dict, tokenizer: Path, out: Path, steps: int) -> None:
    """Train in this process; once `steps` steps are logged, print the result and exit."""
    import torch

    from largeforge.config import load_recipe
    from largeforge.hardware import resolve_precision
    from largeforge.training.loop import train

    precision = resolve_precision("auto", torch.device("cpu"))  # what the loop picks
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    first_step_at: list[float] = []
    metrics = out / "1b" / "metrics.jsonl"

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter(), rss_mib()))
            time.sleep(0.02)

    def watch() -> None:
        while True:
            time.sleep(0.05)
            if not metrics.is_file():
                continue
            records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
            logged = [r for r in records if "tokens_per_s" in r]
            if logged and not first_step_at:
                first_step_at.append(time.perf_counter())
            if len(logged) >= steps:
                stop.set()
                training = [rss for t, rss in samples if t >= first_step_at[0]]
                speeds = [r["tokens_per_s"] for r in logged[1:]] or [logged[0]["tokens_per_s"]]
                row = {"what": "1b", "peak_rss_mib": peak_rss_mib(),
                       "training_rss_mib": max(training or [rss_mib()]),
                       "steps": len(logged), "seconds_per_step": SEQ * BATCH / min(speeds),
                       "tokens_per_s": sorted(speeds)[len(speeds) // 2],
                       "precision": precision}
                print("RESULT " + json.dumps(row), flush=True)
                os._exit(0)  # skip the final evaluation and checkpoint (see the docstring)

    threading.Thread(target=sample, daemon=True).start()
    threading.Thread(target=watch, daemon=True).start()
    recipe = {
        "model": dict(shape),
        "tokenizer": {"path": str(tokenizer)},
        "data": {"train": [str(SHARED_DATA / "tinystories_sample.txt")], "seq_len": SEQ},
        "train": {"batch_size": BATCH, "max_steps": 10**6, "log_every": 1,
                  "eval_every": 10**6, "eval_batches": 1, "warmup_steps": 2, "lr": 3e-4,
                  "gradient_checkpointing": True},
        "output": {"dir": str(out), "name": "1b"},
    }
    train(load_recipe(recipe, environ={}), overwrite=True)
    raise SystemExit("the run ended before the steps were logged")


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        sys.exit(f"{args} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="logged steps of the 1B run")
    parser.add_argument("--run-finetune", action="store_true",
                        help="run finetune.py first (else its last results are used)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: a 2-layer model in place of the 1B one, 2 steps")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "floor":
            print("RESULT " + json.dumps(child_floor()), flush=True)
        else:
            shape = json.loads(args.child[1])
            child_train(shape, Path(args.child[2]), Path(args.child[3]), int(args.child[4]))
        return

    shape = QUICK_SHAPE if args.quick else ONE_B
    steps = 2 if args.quick else args.steps
    if args.run_finetune:
        subprocess.run([sys.executable, str(Path(__file__).with_name("finetune.py"))],
                       check=True)
    finetune_file = RESULTS / "finetune.json"
    finetune = json.loads(finetune_file.read_text()) if finetune_file.is_file() else None

    n_params = parameters_of(shape)
    expected = 16 * n_params / MIB  # weights, gradients, two AdamW moments, fp32
    result: dict = {"shape": shape, "seq_len": SEQ, "batch_size": BATCH, "steps": steps,
                    "gradient_checkpointing": True, "parameters": n_params,
                    "expected_state_mib": expected, "quick": args.quick}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        from largeforge.data.sources import iter_documents, resolve_sources
        from largeforge.tokenizer import train_tokenizer

        data = SHARED_DATA / "tinystories_sample.txt"
        train_tokenizer(iter_documents(resolve_sources([data])), 4096, root / "tok")
        floor = run_child(["--child", "floor"])["peak_rss_mib"]
        free = available_mib()
        if free < 1.2 * expected + floor:
            print(f"skipping the 1B run: {free:,.0f} MiB available, about "
                  f"{1.2 * expected + floor:,.0f} needed")
            result["one_b"] = {"skipped": f"{free:.0f} MiB available"}
        else:
            print(f"training the {n_params / 1e9:.2f}B-parameter shape for {steps} steps ...",
                  flush=True)
            started = time.perf_counter()
            row = run_child(["--child", "train", json.dumps(shape), str(root / "tok"),
                             str(root / "runs"), str(steps)])
            row["wall_s"] = time.perf_counter() - started
            result["one_b"] = row
        result["floor_rss_mib"] = floor
        result["available_mib_before"] = free

    rows = []
    if finetune is not None:
        ft_floor = finetune["floor_rss_mib"]
        result["finetune_base"] = {"source": "benchmarks/results/finetune.json",
                                   "date": finetune["machine"]["date"],
                                   "floor_rss_mib": ft_floor,
                                   "rows": [r for r in finetune["rows"] if r["method"] != "floor"]}
        for r in result["finetune_base"]["rows"]:
            rows.append([f"base preset, {r['method']} ({r['precision']})",
                         f"{r['total'] / 1e6:,.0f}M", f"{r['peak_rss_mib']:,.0f}",
                         f"{r['training_rss_mib']:,.0f}",
                         f"{r['training_rss_mib'] - ft_floor:,.0f}", "-"])
    one_b = result["one_b"]
    if "skipped" not in one_b:
        above = one_b["training_rss_mib"] - floor
        rows.append([f"{'2-layer (quick)' if args.quick else '1B shape'}, full, gradient "
                     f"checkpointing ({one_b['precision']})", f"{n_params / 1e6:,.0f}M",
                     f"{one_b['peak_rss_mib']:,.0f}", f"{one_b['training_rss_mib']:,.0f}",
                     f"{above:,.0f}", f"{expected:,.0f}"])
        result["one_b"]["above_floor_mib"] = above
        result["one_b"]["above_expected_mib"] = above - expected
    print_table(
        f"peak memory of training (MiB); floor (imports only) {floor:,.0f} MiB",
        ["run", "parameters", "peak RSS", "training RSS", "above floor",
         "expected (16 B/param)"], rows,
    )
    write_result("memory", result)


if __name__ == "__main__":
    main()
