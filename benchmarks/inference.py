"""Decoding and prefill speed: our generation paths against `transformers` `generate()` and
llama.cpp (`llama-cpp-python`) on our F32 GGUF of the same model, in one run.

The model is the `small` preset (dim 288, 6 layers, vocabulary 32,000: the stories15M shape)
with random weights (seed 0), saved with a 4,096-token byte-level BPE trained on the TinyStories
sample; the prompts are first sentences of TinyStories stories (10 to 40 tokens). Every path is
greedy and produces exactly `--new-tokens` tokens (EOS ignored: `stop_at_eos=False` for ours,
`min_new_tokens` for `generate()`, and llama.cpp's token loop run to the count), so all do the
same work; the greedy tokens of ours and `generate()` are compared too.

- batch 1: ours is `largeforge generate`'s path (`load_for_inference(..., decode_layout=True)`
  then `generate_ids`); `transformers` is `AutoModelForCausalLM.from_pretrained` then
  `model.generate()`; llama.cpp is `Llama.generate` (top-k 1) on the F32 GGUF written by
  `export_gguf`, with an F32 KV cache. Our loop is also timed on the model as `transformers`
  loads it (standard layout), which separates the loop from the weight layout.
- batch 8: ours is the continuous-batching engine (`ContinuousBatchingEngine`, 8 requests
  submitted at once); `transformers` is `generate()` on the 8 prompts left-padded. llama.cpp is
  left out: `llama-cpp-python`'s `Llama` decodes one sequence at a time.
- prefill: one prompt of `--prefill-tokens` tokens (TinyStories text); prefill tokens/s is the
  prompt length over the time to the first new token.

Decode tokens/s counts the tokens after the first over the time from the first token to the
last (so prefill is out of it); for batch 8, the tokens of all rows over the time from the
moment every row has its first token to the end. Each repeat runs every path once, one after
another (interleaved), and the tables quote medians over `--repeats`. Threads: `--threads 1` by
default (torch, MKL and llama.cpp alike): the 2-core machine is shared with other work, and with
two threads each path's OpenMP workers wait on a busy core (measured here under a load average
of about 2: 20 tokens/s at batch 1 against 110 with one thread).

    python benchmarks/inference.py [--new-tokens 128] [--repeats 5] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import SHARED_DATA, median, print_table, write_result

BATCH = 8


def make_model(directory: Path) -> None:
    """The `small` preset with random weights and a TinyStories BPE, saved as a model dir."""
    from largeforge.models import build_model, preset
    from largeforge.tokenizer import train_tokenizer

    text = (SHARED_DATA / "tinystories_sample.txt").read_text(encoding="utf-8")
    tokenizer = train_tokenizer(text.splitlines(), 4096, directory / "tokenizer")
    torch.manual_seed(0)
    model = build_model(preset("small"), eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")


def prompts(tokenizer: Any, count: int) -> list[list[int]]:
    """BOS + the first sentence of each of the first `count` stories of a useful length."""
    from largeforge.inference.generate import encode_prompt

    out: list[list[int]] = []
    for line in (SHARED_DATA / "tinystories_sample.txt").read_text(encoding="utf-8").splitlines():
        sentence = line.split(". ")[0].strip()
        ids = encode_prompt(tokenizer, sentence)[0].tolist()
        if 10 <= len(ids) <= 40 and ids not in out:
            out.append(ids)
        if len(out) == count:
            return out
    raise SystemExit("the TinyStories sample has too few stories")


def long_prompt(tokenizer: Any, length: int) -> list[int]:
    from largeforge.inference.generate import encode_prompt

    text = (SHARED_DATA / "tinystories_sample.txt").read_text(encoding="utf-8")[:20000]
    return encode_prompt(tokenizer, text)[0, :length].tolist()


class Clock:
    """Times at which new tokens arrived (the first one ends prefill)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.stamps: list[float] = []

    def tick(self) -> None:
        self.stamps.append(time.perf_counter())

    def result(self, tokens_per_stamp: int = 1) -> dict[str, float]:
        first, last = self.stamps[0], self.stamps[-1]
        decoded = (len(self.stamps) - 1) * tokens_per_stamp
        return {"ttft_s": first - self.start,
                "decode_tokens_per_s": decoded / max(last - first, 1e-9),
                "total_s": last - self.start}


def ours_batch1(model: Any, ids: list[int], new_tokens: int) -> tuple[dict, list[int]]:
    from largeforge.inference.generate import generate_ids
    from largeforge.inference.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
    clock, out = Clock(), []
    for token in generate_ids(model, torch.tensor([ids]), params, set()):
        clock.tick()
        out.append(token)
    return clock.result(), out


class _StampStreamer:
    """A `transformers` streamer that only notes when each step's tokens arrive."""

    def __init__(self, clock: Clock) -> None:
        self.clock, self.prompt_seen = clock, False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:  # generate() first puts the prompt itself
            self.clock.tick()
        self.prompt_seen = True

    def end(self) -> None:
        pass


def hf_generate(model: Any, rows: list[list[int]], new_tokens: int, pad_id: int
                ) -> tuple[dict, list[list[int]]]:
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    clock = Clock()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id,
                             streamer=_StampStreamer(clock))
    return clock.result(len(rows)), out[:, width:].tolist()


class TimedEngineRun:
    """All rows submitted to the continuous-batching engine at once; timed to the last token."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer

    def run(self, rows: list[list[int]], new_tokens: int) -> tuple[dict, list[list[int]]]:
        from largeforge.inference.engine import ContinuousBatchingEngine
        from largeforge.inference.requests import GenerationRequest
        from largeforge.inference.sampling import SamplingParams

        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
        with ContinuousBatchingEngine(self.model, self.tokenizer,
                                      max_batch_size=len(rows)) as engine:
            start = time.perf_counter()
            handles = [engine.submit(GenerationRequest(list(r), params)) for r in rows]
            outputs = [handle.result().token_ids for handle in handles]
            end = time.perf_counter()
        total = len(rows) * new_tokens
        return {"total_s": end - start, "tokens_per_s": total / (end - start)}, outputs


def open_llama(path: Path, threads: int, n_ctx: int) -> Any:
    import gguf
    import llama_cpp

    f32 = int(gguf.GGMLQuantizationType.F32)  # F32 KV cache: fp32 throughout, as ours
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                           n_threads=threads, n_threads_batch=threads, seed=0, type_k=f32,
                           type_v=f32, verbose=False)


def llama_batch1(llm: Any, ids: list[int], new_tokens: int) -> tuple[dict, list[int]]:
    clock, out = Clock(), []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, reset=True):
        clock.tick()
        out.append(int(token))
        if len(out) == new_tokens:
            break
    return clock.result(), out


def llama_prefill(llm: Any, ids: list[int]) -> float:
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    return time.perf_counter() - start


def decode_profile(model: Any, ids: list[int], steps: int = 32) -> dict:
    """Where a batch-1 decode step of ours spends its time (torch.profiler, per step)."""
    from torch.profiler import ProfilerActivity, profile

    from largeforge.inference.generate import generate_ids
    from largeforge.inference.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=steps + 8, temperature=0.0, stop_at_eos=False)
    tokens = generate_ids(model, torch.tensor([ids]), params, set())
    for _ in range(8):  # prefill and a few steps first
        next(tokens)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            next(tokens)
        wall = time.perf_counter() - start
    tokens.close()
    ops = sorted(((e.key, e.self_cpu_time_total / 1e3 / steps) for e in prof.key_averages()
                  if e.key.startswith("aten::")), key=lambda kv: -kv[1])
    matmul = sum(ms for name, ms in ops if name in ("aten::mm", "aten::addmm", "aten::bmm"))
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    weight_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    total = sum(ms for _, ms in ops)
    return {"step_ms_under_profiler": 1e3 * wall / steps, "operators_ms": dict(ops[:10]),
            "operators_total_ms": total, "matmul_ms": matmul,
            "other_operators_ms": total - matmul,
            "outside_operators_ms": 1e3 * wall / steps - total,  # Python, module calls
            "weight_mib": weight_bytes / 2**20,
            "matmul_weight_gb_per_s": weight_bytes / (matmul / 1e3) / 1e9 if matmul else None}


def agreement(a: list[int], b: list[int]) -> float:
    """Fraction of positions where two greedy outputs agree before they first differ."""
    same = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        same += 1
    return same / max(len(a), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="0: torch's default")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few tokens, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.repeats, args.prefill_tokens = 16, 1, 64
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    from transformers import AutoModelForCausalLM

    from largeforge.export.gguf import export_gguf
    from largeforge.inference.generate import generate_ids, load_for_inference
    from largeforge.inference.sampling import SamplingParams

    try:
        import llama_cpp  # noqa: F401
        have_llama = True
    except ImportError:
        have_llama = False

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("building the model ...", flush=True)
        make_model(root)
        model_dir = root / "model"
        ours, tokenizer = load_for_inference(model_dir, "cpu", decode_layout=True)
        standard, _ = load_for_inference(model_dir, "cpu")
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        gguf_path = export_gguf(model_dir, root / "model-f32.gguf", dtype="f32")
        llm = open_llama(gguf_path, threads, hf.config.max_position_embeddings) \
            if have_llama else None
        rows = prompts(tokenizer, BATCH)
        one = rows[0]
        long = long_prompt(tokenizer, args.prefill_tokens)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        engine = TimedEngineRun(ours, tokenizer)

        times: dict[str, list[dict]] = {k: [] for k in (
            "ours_b1", "ours_b1_standard_layout", "hf_b1", "llama_b1", "ours_b8", "hf_b8",
            "prefill_ours", "prefill_hf", "prefill_llama")}
        tokens: dict[str, Any] = {}
        # warm-up: first-call costs (allocator, MKL, llama.cpp graph) out of the numbers
        ours_batch1(ours, one, 4)
        hf_generate(hf, [one], 4, pad)
        if llm is not None:
            llama_batch1(llm, one, 4)
        for repeat in range(args.repeats):
            print(f"repeat {repeat + 1}/{args.repeats} ...", flush=True)
            gc.collect()
            r, tokens["ours_b1"] = ours_batch1(ours, one, args.new_tokens)
            times["ours_b1"].append(r)
            r, tokens["hf_b1"] = hf_generate(hf, [one], args.new_tokens, pad)
            times["hf_b1"].append(r)
            tokens["hf_b1"] = tokens["hf_b1"][0]
            r, tokens["ours_b1_standard_layout"] = ours_batch1(standard, one, args.new_tokens)
            times["ours_b1_standard_layout"].append(r)
            if llm is not None:
                r, tokens["llama_b1"] = llama_batch1(llm, one, args.new_tokens)
                times["llama_b1"].append(r)
            r, tokens["ours_b8"] = engine.run(rows, args.new_tokens)
            times["ours_b8"].append(r)
            r, tokens["hf_b8"] = hf_generate(hf, rows, args.new_tokens, pad)
            times["hf_b8"].append(r)
            # prefill: time to the first token of the long prompt
            params = SamplingParams(max_new_tokens=1, temperature=0.0, stop_at_eos=False)
            start = time.perf_counter()
            list(generate_ids(ours, torch.tensor([long]), params, set()))
            times["prefill_ours"].append({"s": time.perf_counter() - start})
            r, _ = hf_generate(hf, [long], 1, pad)
            times["prefill_hf"].append({"s": r["ttft_s"]})
            if llm is not None:
                times["prefill_llama"].append({"s": llama_prefill(llm, long)})
        profile_b1 = decode_profile(ours, one)
        if llm is not None:
            llm.close()
    load_after = os.getloadavg()[0]

    def med(key: str, field: str) -> float | None:
        values = [t[field] for t in times[key] if field in t]
        return median(values) if values else None

    decode = {
        "ours_b1": med("ours_b1", "decode_tokens_per_s"),
        "ours_b1_standard_layout": med("ours_b1_standard_layout", "decode_tokens_per_s"),
        "hf_b1": med("hf_b1", "decode_tokens_per_s"),
        "llama_b1": med("llama_b1", "decode_tokens_per_s"),
        "hf_b8": med("hf_b8", "decode_tokens_per_s"),
    }
    end_to_end = {
        "ours_b8": BATCH * args.new_tokens / med("ours_b8", "total_s"),
        "hf_b8": BATCH * args.new_tokens / med("hf_b8", "total_s"),
        "ours_b1": args.new_tokens / med("ours_b1", "total_s"),
        "hf_b1": args.new_tokens / med("hf_b1", "total_s"),
    }
    if times["llama_b1"]:
        end_to_end["llama_b1"] = args.new_tokens / med("llama_b1", "total_s")
    prefill = {k: len(long) / med(f"prefill_{k}", "s")
               for k in ("ours", "hf", "llama") if times[f"prefill_{k}"]}
    same = {
        "ours_vs_hf_b1": tokens["ours_b1"] == tokens["hf_b1"],
        "standard_layout_vs_hf_b1": tokens["ours_b1_standard_layout"] == tokens["hf_b1"],
        "ours_engine_vs_hf_b8": tokens["ours_b8"] == tokens["hf_b8"],
    }
    if "llama_b1" in tokens:
        same["llama_agreement_b1"] = agreement(tokens["llama_b1"], tokens["hf_b1"])

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "-"

    rows_b1 = [
        ["largeforge generate (decode layout)", decode["ours_b1"], end_to_end["ours_b1"]],
        ["largeforge loop, standard layout", decode["ours_b1_standard_layout"], None],
        ["transformers generate()", decode["hf_b1"], end_to_end["hf_b1"]],
        ["llama.cpp (F32 GGUF)", decode["llama_b1"], end_to_end.get("llama_b1")],
    ]
    print_table(
        f"decode, batch 1, `small` preset (random weights, vocab 32,000), {args.new_tokens} new "
        f"tokens after a {len(one)}-token prompt, greedy, {threads} thread(s); "
        f"median of {args.repeats}",
        ["path", "decode tokens/s", "vs transformers", "end-to-end tokens/s"],
        [[name, f"{d:,.0f}" if d else "-", ratio(d, decode["hf_b1"]),
          f"{e:,.0f}" if e else "-"] for name, d, e in rows_b1],
    )
    print_table(
        f"batch {BATCH}: {BATCH} prompts of {min(map(len, rows))}-{max(map(len, rows))} tokens, "
        f"{args.new_tokens} new tokens each; tokens/s of all rows, prefill included",
        ["path", "tokens/s", "vs transformers"],
        [["largeforge engine (continuous batching)", f"{end_to_end['ours_b8']:,.0f}",
          ratio(end_to_end["ours_b8"], end_to_end["hf_b8"])],
         ["transformers generate(), left-padded", f"{end_to_end['hf_b8']:,.0f}", "1.00x"]],
    )
    print_table(
        f"prefill of a {len(long)}-token prompt (prompt tokens / time to the first new token)",
        ["path", "prefill tokens/s", "vs transformers"],
        [[k, f"{v:,.0f}", ratio(v, prefill.get("hf"))] for k, v in prefill.items()],
    )
    llama_rate = decode["llama_b1"]
    if llama_rate:  # llama.cpp reads every weight once per token too
        profile_b1["llama_step_ms"] = 1e3 / llama_rate
        profile_b1["llama_weight_gb_per_s"] = profile_b1["weight_mib"] * 2**20 * llama_rate / 1e9
    ops = ", ".join(f"{k} {v:.2f}" for k, v in list(profile_b1["operators_ms"].items())[:5])
    print(f"\nprofile of our batch-1 decode step: {profile_b1['step_ms_under_profiler']:.2f} ms "
          f"under the profiler; matmuls {profile_b1['matmul_ms']:.2f} ms, reading "
          f"{profile_b1['weight_mib']:.0f} MiB of weights at "
          f"{profile_b1['matmul_weight_gb_per_s'] or 0:.1f} GB/s; other operators "
          f"{profile_b1['other_operators_ms']:.2f} ms; outside operators (Python, module "
          f"calls) {profile_b1['outside_operators_ms']:.2f} ms; top operators (ms): {ops}"
          + (f"; llama.cpp's whole step {profile_b1['llama_step_ms']:.2f} ms "
             f"({profile_b1['llama_weight_gb_per_s']:.1f} GB/s of weights)" if llama_rate
             else ""))
    print(f"\nsame greedy tokens: {same}; load average {load_before:.1f} before, "
          f"{load_after:.1f} after, on {os.cpu_count()} cores")
    write_result("inference", {
        "settings": {"preset": "small", "vocab_size": 32000, "weights": "random (seed 0)",
                     "new_tokens": args.new_tokens, "batch": BATCH, "prompt_tokens_b1": len(one),
                     "prompt_tokens_b8": [len(r) for r in rows], "prefill_tokens": len(long),
                     "repeats": args.repeats, "threads": threads, "quick": args.quick,
                     "llama_cpp": have_llama},
        "decode_tokens_per_s": decode,
        "end_to_end_tokens_per_s": end_to_end,
        "prefill_tokens_per_s": prefill,
        "ratios": {
            "ours_vs_hf_decode_b1": _div(decode["ours_b1"], decode["hf_b1"]),
            "ours_vs_llama_decode_b1": _div(decode["ours_b1"], decode["llama_b1"]),
            "layout_gain_b1": _div(decode["ours_b1"], decode["ours_b1_standard_layout"]),
            "ours_vs_hf_b8": _div(end_to_end["ours_b8"], end_to_end["hf_b8"]),
            "ours_vs_hf_prefill": _div(prefill.get("ours"), prefill.get("hf")),
        },
        "same_tokens": same,
        "profile_b1": profile_b1,
        "raw": times,
        "load_average_1min": {"before": load_before, "after": load_after},
    })


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


with contextlib.suppress(ImportError):  # quiet transformers' generation warnings
    from transformers.utils import logging as _hf_logging

    _hf_logging.set_verbosity_error()

if __name__ == "__main__":
    main()
