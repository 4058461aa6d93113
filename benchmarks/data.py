"""Validate + tokenize the Alpaca sample: one record at a time, batched, and batched in two
processes, in one run.

- one process, record by record: `validate_records` (every check of `data validate`), then each
  valid record normalised and rendered with the chatml template + loss mask one at a time.
- batched: `load_records` (batched `datasets` map), then `datasets.map` over batches of 256
  conversations with one Rust-side encoding per batch (`render_batch_for_training`).
- batched, 2 processes: the same with `num_proc=2`.
Each path starts from a cold cache. Records/s = records / wall time of the whole path; the ids and
labels of all three are checked equal.

    python benchmarks/data.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import SHARED_DATA, print_table, write_result
from largeforge.chat_templates import get_template, render_batch_for_training, render_for_training
from largeforge.data.formats import load_records, normalise_record
from largeforge.data.validate import validate_records
from largeforge.tokenizer import train_tokenizer

SAMPLE = SHARED_DATA / "alpaca_sample.json"
DATA = SAMPLE  # or a larger copy, with --copies


def one_at_a_time(tokenizer: Any, template: str) -> list[tuple[list[int], list[int]]]:
    report = validate_records(DATA)
    samples = []
    for record in report.valid:
        shaped = normalise_record(record.data, report.format)
        samples.append(render_for_training(tokenizer, shaped["messages"], template))
    return samples


def _tokenize_batch(batch: dict[str, list], tokenizer: Any, template: str) -> dict[str, list]:
    rendered = render_batch_for_training(tokenizer, batch["messages"], template)
    return {"input_ids": [ids for ids, _ in rendered], "labels": [lab for _, lab in rendered]}


def batched(tokenizer: Any, template: str, cache: Path, num_proc: int | None) -> list[tuple]:
    validate_records(DATA)
    loaded = load_records(DATA, num_proc=num_proc, cache_dir=cache)
    tokenized = loaded.dataset.map(
        functools.partial(_tokenize_batch, tokenizer=tokenizer, template=template),
        batched=True, batch_size=256, num_proc=num_proc, remove_columns=["messages", "source"],
        load_from_cache_file=False,
    )
    return list(zip(tokenized["input_ids"], tokenized["labels"], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copies", type=int, default=1,
                        help="run on N distinct copies of the sample (each instruction tagged)")
    args = parser.parse_args()
    import datasets

    global DATA
    datasets.disable_progress_bars()
    records = json.loads(SAMPLE.read_text(encoding="utf-8"))
    if args.copies > 1:
        records = [{**r, "instruction": f"{r['instruction']} (copy {k})"}
                   for k in range(args.copies) for r in records]
    template = get_template("chatml")
    times: dict[str, list[float]] = {"one": [], "batched": [], "batched2": []}
    with tempfile.TemporaryDirectory() as tmp:
        if args.copies > 1:
            DATA = Path(tmp) / "alpaca_copies.json"
            DATA.write_text(json.dumps(records), encoding="utf-8")
        texts = (r["instruction"] + "\n" + r.get("input", "") + "\n" + r["output"] for r in records)
        tokenizer = train_tokenizer(texts, 4096, Path(tmp) / "tok")
        reference = None
        for repeat in range(args.repeats):
            for name, num_proc in (("one", 0), ("batched", None), ("batched2", 2)):
                start = time.perf_counter()
                produced = (one_at_a_time(tokenizer, template) if name == "one" else
                            batched(tokenizer, template, Path(tmp) / f"{name}{repeat}", num_proc))
                samples = [(list(a), list(b)) for a, b in produced]
                times[name].append(time.perf_counter() - start)
                reference = reference or samples
                assert samples == reference, f"{name} gave different ids or labels"
    n = len(records)
    med = {k: statistics.median(v) for k, v in times.items()}
    labels = {"one": "one process, record by record", "batched": "batched, 1 process",
              "batched2": "batched, 2 processes"}
    rows = [[labels[k], f"{med[k]:.2f} s", f"{n / med[k]:,.0f}", f"{med['one'] / med[k]:.2f}x"]
            for k in times]
    print_table(f"validate + tokenize {n:,} Alpaca records (chatml, loss masks), "
                f"median of {args.repeats}", ["path", "wall", "records/s", "vs one"], rows)
    write_result("data" if args.copies == 1 else f"data_x{args.copies}", {
        "records": n, "copies": args.copies, "repeats": args.repeats, "template": "chatml",
        "vocab_size": len(tokenizer),
        "wall_s": times, "median_wall_s": med,
        "records_per_s": {k: n / v for k, v in med.items()},
        "speedup_vs_one": {k: med["one"] / v for k, v in med.items()},
    })


if __name__ == "__main__":
    main()
