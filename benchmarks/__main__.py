"""Run every benchmark, one after another, each in a process of its own, then render
`docs/benchmarks.md` from `benchmarks/results/*.json`.

    python -m benchmarks                      # everything (about 38 minutes on 2 cores)
    python -m benchmarks --only inference     # one (repeat --only for more)
    python -m benchmarks --quick              # a smoke run of everything, a few minutes
    python -m benchmarks --report-only        # re-render the report from the results
    python -m benchmarks --list

A full run writes `benchmarks/results/<name>.json` and `docs/benchmarks.md`. A `--quick` run
takes a few steps of each with small settings: its numbers mean nothing, so its results and its
report go to a directory of their own (`--results`, a new temporary directory by default) and
the real ones are left alone. A benchmark that fails is reported and the others still run; the
exit status is then 1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # `report` (and the scripts' `common`) live here

import report  # noqa: E402


@dataclass(frozen=True)
class Benchmark:
    name: str  # the result file it writes: results/<name>.json
    script: str
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] = ()
    about: str = ""


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("data", "data.py", ("--repeats", "5"), ("--repeats", "1"),
              "validate + tokenize the Alpaca sample: one by one, batched, 2 processes"),
    Benchmark("data_x10", "data.py", ("--copies", "10", "--repeats", "3"),
              ("--copies", "2", "--repeats", "1"), "the same on 10 copies of the sample"),
    Benchmark("pretrain", "pretrain.py", ("--compile",), ("--quick",),
              "largeforge train vs a plain transformers step vs the Trainer; profile"),
    Benchmark("shakespeare_char", "shakespeare_char.py", (), ("--iters", "50"),
              "char-level Tiny Shakespeare, nanoGPT's baby-GPT setting, 2,000 iterations"),
    Benchmark("finetune", "finetune.py", (), ("--steps", "4"),
              "full / LoRA / QLoRA fine-tuning of the base preset: tokens/s and RSS"),
    Benchmark("memory", "memory.py", (), ("--quick",),
              "peak RSS: base-preset fine-tuning and a 1B shape with gradient checkpointing"),
    Benchmark("inference", "inference.py", (), ("--quick",),
              "decode (batch 1 and 8) and prefill vs transformers generate() and llama.cpp"),
    Benchmark("serve", "serve.py", (),
              ("--rounds", "1", "--max-tokens", "8", "--requests", "32", "--flood-tokens", "4"),
              "16 streaming clients vs 1 through `serve inference`, then a request flood"),
    Benchmark("real_model", "real_model.py", (), ("--quick",),
              "SmolLM2-135M: LoRA/QLoRA vs Trainer+peft and TRL; decode vs generate(), "
              "llama.cpp F16/Q4_K_M"),
)
NAMES = [b.name for b in BENCHMARKS]

# Runs a benchmark script as __main__ with `common.RESULTS` pointed at the chosen directory,
# so the scripts themselves need no option for it.
RUNNER = (
    "import pathlib, runpy, sys\n"
    "import common\n"
    "common.RESULTS = pathlib.Path(sys.argv[2])\n"
    "script = sys.argv[1]\n"
    "sys.argv = [script, *sys.argv[3:]]\n"
    "runpy.run_path(script, run_name='__main__')\n"
)


def run_benchmark(bench: Benchmark, results: Path, quick: bool) -> tuple[int, float]:
    """Run one benchmark script in a child process (its output goes straight through);
    return (exit status, seconds)."""
    args = bench.quick_args if quick else bench.args
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(HERE / bench.script), str(results), *args],
        cwd=HERE, env=env, check=False,
    )
    return proc.returncode, time.perf_counter() - start


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true",
                        help="small settings, a smoke run; results go to --results")
    parser.add_argument("--only", action="append", metavar="NAME", default=[],
                        help=f"run only this benchmark (repeatable): {', '.join(NAMES)}")
    parser.add_argument("--results", type=Path, default=None,
                        help="where result files go (default: benchmarks/results; with "
                        "--quick a new temporary directory)")
    parser.add_argument("--output", type=Path, default=None,
                        help="the report (default: docs/benchmarks.md; with --quick "
                        "<results>/benchmarks.md)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing, render the report from the results")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    names = [n.strip() for value in args.only for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(map(repr, unknown))}; "
                     f"expected one of: {', '.join(NAMES)}")
    args.only = names
    if args.results is not None and args.results.exists() and not args.results.is_dir():
        parser.error(f"--results {args.results} exists and is not a directory")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for bench in BENCHMARKS:
            print(f"{bench.name:18} {bench.about}")
        return 0
    if args.results is not None:
        results = args.results
    elif args.quick:
        results = Path(tempfile.mkdtemp(prefix="largeforge-bench-quick-"))
    else:
        results = report.RESULTS
    results.mkdir(parents=True, exist_ok=True)
    output = args.output or (results / "benchmarks.md" if args.quick else report.OUTPUT)

    chosen = [b for b in BENCHMARKS if not args.only or b.name in args.only]
    failed: list[str] = []
    timings: list[tuple[str, int, float]] = []
    if not args.report_only:
        for n, bench in enumerate(chosen, 1):
            print(f"\n=== [{n}/{len(chosen)}] {bench.name}: {bench.about}"
                  f"{' (quick)' if args.quick else ''}", flush=True)
            status, seconds = run_benchmark(bench, results, args.quick)
            timings.append((bench.name, status, seconds))
            if status != 0:
                failed.append(bench.name)
                print(f"=== {bench.name} failed (exit {status}) after {seconds:.0f} s",
                      flush=True)
        print("\nbenchmark             status   seconds")
        for name, status, seconds in timings:
            print(f"{name:20} {'ok' if status == 0 else f'exit {status}':>7} {seconds:9.0f}")
    try:
        written = report.write_report(results, output)
    except report.ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\nresults in {results}; report {written}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
