"""Serving throughput: one streaming client against 16 concurrent ones, then 1,000 requests at
concurrency 32, all through a real `largeforge serve inference` on 127.0.0.1 and the official
`openai` client (AsyncOpenAI).

The model is the `small` preset (dim 288, 6 layers: the stories15M shape) with random weights
and a 4,096-token byte-level BPE trained on the TinyStories sample; the prompts are the first
sentences of 16 stories of that sample (10 to 40 tokens). Every request is greedy with
`ignore_eos` (an extension of ours, as vLLM has it), so each answer is exactly `--max-tokens`
tokens and the two runs do the same work:

1. one client streams the 16 prompts one after another;
2. 16 clients stream them at once (the engine decodes them as one batch).

Each run goes through the prompts `--rounds` times (3). Aggregate tokens/s is the completion
tokens of all answers over the wall time of the run; time to first token (TTFT) is measured by
the client, from sending the request to the first chunk with text. Then 1,000 non-streamed
requests of `--flood-tokens` tokens go out 32 at a time; every status is counted (the target:
no 5xx).

The client runs on the same machine as the server and takes CPU from it, so the server runs
with `--threads 1` by default (`--threads 0`: torch's default, one per core). With two model
threads on the 2-core machine (load average 2.6, other jobs running), the single client fell
to 29 tokens/s (34 ms a token) against 164 with one thread, while 16 clients (842 against 796
tokens/s) and the flood (43 against 45 requests/s) were about the same: torch's OpenMP workers
keep the second core busy between the small ops of a one-row decode step, and the event loop
that sends each token, and the client reading it, wait for it.

    python benchmarks/serve.py [--max-tokens 64] [--requests 1000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from openai import AsyncOpenAI

from common import SHARED_DATA, print_table, write_result

CLIENTS = 16
NAME = "small-random"
LISTENING = re.compile(r"serving \S+ on (http://\S+:\d+)/v1")


def make_model(directory: Path) -> None:
    from largeforge.models import ModelConfig, build_model, preset
    from largeforge.tokenizer import train_tokenizer

    text = (SHARED_DATA / "tinystories_sample.txt").read_text(encoding="utf-8")
    tokenizer = train_tokenizer(text.splitlines(), 4096, directory / "tokenizer")
    shape = preset("small").model_dump()
    shape.update(vocab_size=len(tokenizer))
    model = build_model(ModelConfig(**shape), eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")


def prompts() -> list[str]:
    """The first sentence of each of the first 16 stories that have one of a useful length."""
    out: list[str] = []
    for line in (SHARED_DATA / "tinystories_sample.txt").read_text(encoding="utf-8").splitlines():
        sentence = line.split(". ")[0].strip()
        if 40 <= len(sentence) <= 160 and sentence not in out:
            out.append(sentence)
        if len(out) == CLIENTS:
            return out
    raise SystemExit("the TinyStories sample has too few stories")


def start_server(model_dir: Path, log: Path, max_batch: int, max_queue: int,
                 threads: int) -> tuple:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "largeforge.cli.main", "serve", "inference", "--model",
             str(model_dir), "--port", "0", "--served-model-name", NAME, "--max-batch-size",
             str(max_batch), "--max-queue", str(max_queue),
             *(["--threads", str(threads)] if threads else [])],
            env=env, stdout=subprocess.DEVNULL, stderr=err,
        )
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()}")
        match = LISTENING.search(log.read_text())
        if match:
            try:
                if httpx.get(f"{match.group(1)}/health").status_code == 200:
                    return proc, match.group(1)
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


async def stream_one(client: AsyncOpenAI, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    ttft = None
    tokens = 0
    stream = await client.completions.create(
        model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].text:
            ttft = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"ttft": ttft, "tokens": tokens, "latency": time.perf_counter() - start}


async def sequential(
    client: AsyncOpenAI, texts: list[str], max_tokens: int, rounds: int
) -> tuple[list[dict], float]:
    start = time.perf_counter()
    results = [await stream_one(client, t, max_tokens) for _ in range(rounds) for t in texts]
    return results, time.perf_counter() - start


async def concurrent(
    client: AsyncOpenAI, texts: list[str], max_tokens: int, rounds: int
) -> tuple[list[dict], float]:
    start = time.perf_counter()
    results: list[dict] = []
    for _ in range(rounds):
        results += await asyncio.gather(*(stream_one(client, t, max_tokens) for t in texts))
    return results, time.perf_counter() - start


async def flood(
    client_factory: Callable[[], AsyncOpenAI], texts: list[str], n: int, concurrency: int,
    max_tokens: int,
) -> tuple[Counter, list[float], float, int]:
    """`n` non-streamed requests, `concurrency` at a time; statuses and latencies."""
    import openai

    client = client_factory()
    statuses: Counter = Counter()
    latencies: list[float] = []
    tokens = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker() -> None:
        nonlocal tokens
        while not queue.empty():
            i = queue.get_nowait()
            start = time.perf_counter()
            try:
                result = await client.completions.create(
                    model=NAME, prompt=texts[i % len(texts)], max_tokens=max_tokens,
                    temperature=0.8, seed=i, extra_body={"ignore_eos": True},
                )
                statuses[200] += 1
                tokens += result.usage.completion_tokens
            except openai.APIStatusError as exc:
                statuses[exc.status_code] += 1
            except openai.APIConnectionError:
                statuses["connection error"] += 1
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses, latencies, time.perf_counter() - start, tokens


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank on the sorted values)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def summary(results: list[dict], wall: float) -> dict:
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "completion_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_s": statistics.median(ttfts),
            "ttft_p99_s": pct(ttfts, 99), "ttft_max_s": max(ttfts)}


async def run(base: str, args: argparse.Namespace) -> dict:
    def make_client() -> AsyncOpenAI:
        return AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)

    client = make_client()
    texts = prompts()
    await stream_one(client, texts[0], 4)  # warm-up: first-call costs out of the numbers
    one, one_wall = await sequential(client, texts, args.max_tokens, args.rounds)
    many, many_wall = await concurrent(client, texts, args.max_tokens, args.rounds)
    statuses, latencies, flood_wall, flood_tokens = await flood(
        make_client, texts, args.requests, args.concurrency, args.flood_tokens)
    return {
        "one_client": summary(one, one_wall),
        "concurrent": summary(many, many_wall),
        "flood": {"requests": args.requests, "concurrency": args.concurrency,
                  "max_tokens": args.flood_tokens, "statuses": {str(k): v for k, v in
                                                                statuses.items()},
                  "wall_s": flood_wall, "requests_per_s": args.requests / flood_wall,
                  "tokens_per_s": flood_tokens / flood_wall,
                  "latency_p50_s": statistics.median(latencies),
                  "latency_p99_s": pct(latencies, 99)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3,
                        help="times each client run goes through the 16 prompts")
    parser.add_argument("--flood-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="the server's --threads (0: torch's default)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("building the model ...", flush=True)
        make_model(root)
        proc, base = start_server(root / "model", root / "server.log", max_batch=32,
                                  max_queue=1024, threads=args.threads)
        try:
            print(f"server at {base}; running ...", flush=True)
            load_before = os.getloadavg()[0]
            result = asyncio.run(run(base, args))
            # Other work on the machine slows both runs; the 1-minute load says how much.
            result["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)

    one, many, fl = result["one_client"], result["concurrent"], result["flood"]
    ratio = many["tokens_per_s"] / one["tokens_per_s"]
    print_table(
        f"`small` preset (random weights), {CLIENTS} prompts x {args.rounds} rounds, "
        f"{args.max_tokens} tokens each, greedy, streamed",
        ["clients", "tokens", "wall s", "tokens/s", "vs one", "TTFT p50 ms", "TTFT p99 ms"],
        [[label, r["completion_tokens"], f"{r['wall_s']:.1f}", f"{r['tokens_per_s']:,.0f}",
          f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}x", f"{r['ttft_p50_s'] * 1e3:,.0f}",
          f"{r['ttft_p99_s'] * 1e3:,.0f}"]
         for label, r in (("1 (one after another)", one), (f"{CLIENTS} at once", many))],
    )
    fivexx = sum(v for k, v in fl["statuses"].items() if k.isdigit() and int(k) >= 500)
    print_table(
        f"{fl['requests']} requests, {fl['concurrency']} at a time, {fl['max_tokens']} tokens "
        "each (sampled)",
        ["statuses", "5xx", "wall s", "requests/s", "tokens/s", "latency p50 ms",
         "latency p99 ms"],
        [[", ".join(f"{k}: {v}" for k, v in sorted(fl["statuses"].items())), fivexx,
          f"{fl['wall_s']:.1f}", f"{fl['requests_per_s']:.1f}", f"{fl['tokens_per_s']:,.0f}",
          f"{fl['latency_p50_s'] * 1e3:,.0f}", f"{fl['latency_p99_s'] * 1e3:,.0f}"]],
    )
    print(f"\naggregate tokens/s, {CLIENTS} concurrent vs one client: {ratio:.2f}x "
          f"(target >= 5x); load average {result['load_average_1min']['before']:.1f} before, "
          f"{result['load_average_1min']['after']:.1f} after, on {os.cpu_count()} cores")
    write_result("serve", {"prompts": CLIENTS, "rounds": args.rounds,
                           "max_tokens": args.max_tokens,
                           "server_threads": args.threads or "torch default",
                           "ratio_concurrent_vs_one": ratio, "no_5xx": fivexx == 0, **result})


if __name__ == "__main__":
    main()
