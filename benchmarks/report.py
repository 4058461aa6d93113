"""Render `docs/benchmarks.md` from the result files `benchmarks/results/*.json`.

One section per benchmark: what it measured, its table, the machine, versions and date of that
run, and the issue's targets it is judged against, each met or missed and by how much. A
benchmark this module has no renderer for still gets a section (its top-level numbers).

    python benchmarks/report.py [--results DIR] [--output FILE]

Standard library only, so that it renders anywhere (no torch import).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUTPUT = HERE.parent / "docs" / "benchmarks.md"
ORDER = ("pretrain", "shakespeare_char", "data", "data_x10", "finetune", "memory", "inference",
         "serve", "real_model")


class ReportError(Exception):
    """A result file or directory that cannot be rendered (the message says why)."""


@dataclass
class Target:
    """A goal from the issue: `value` against `goal`, higher (or lower) is better."""

    name: str
    value: float | None
    goal: float
    higher_is_better: bool = True
    unit: str = "x"

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.goal if self.higher_is_better else self.value <= self.goal

    def fmt(self, number: float) -> str:
        if self.unit == "%":
            return f"{100 * number:.1f}%"
        if self.unit == "x":
            return f"{number:.2f}x"
        return f"{number:.3f}"

    def verdict(self) -> str:
        if self.value is None:
            return "not measured"
        if self.higher_is_better:
            margin = self.value / self.goal - 1 if self.goal else 0.0
        else:
            margin = 1 - self.value / self.goal if self.goal else 0.0
        word = "met" if self.met else "missed"
        return f"{word} by {abs(100 * margin):.1f}%"

    def row(self) -> list[str]:
        sign = ">=" if self.higher_is_better else "<="
        value = "-" if self.value is None else self.fmt(self.value)
        return [self.name, f"{sign} {self.fmt(self.goal)}", value, self.verdict()]


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[tuple[str, list[str], list[list[Any]]]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}"
    return str(value)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


# --- one renderer per benchmark -------------------------------------------------------------


def render_pretrain(r: dict) -> Section:
    s = r.get("settings", {})
    section = Section(
        "Pretraining throughput (`benchmarks/pretrain.py`)",
        f"The `{s.get('preset', 'small')}` preset, seq {s.get('seq_len')}, batch "
        f"{s.get('batch_size')}, {s.get('rounds', 1)} round(s) of {s.get('steps')} steps per loop "
        f"(the first {s.get('warmup_steps_left_out')} of each left out of the medians), "
        f"{s.get('threads', '?')} threads, the TinyStories sample; every loop on the same model, "
        "data and optimizer in one run. MFU: training FLOPs per token x tokens/s over the "
        "matmul peak of the same precision, measured in the run.",
    )
    labels = {"plain_transformers": "plain transformers step", "trainer": "transformers Trainer",
              "largeforge": "largeforge train", "largeforge_compile": "largeforge train, compile"}
    rows = []
    for precision in ("fp32", "bf16"):
        entry = r.get(precision)
        if not entry:
            continue
        trainer = entry.get("trainer", {}).get("tokens_per_s")
        plain = entry.get("plain_transformers", {}).get("tokens_per_s")
        best_trainer = entry.get("trainer", {}).get("best_round_tokens_per_s")
        for key, label in labels.items():
            if key in entry:
                tps = entry[key]["tokens_per_s"]
                best = entry[key].get("best_round_tokens_per_s")
                rows.append([f"{label}, {precision}", num(tps), num(best),
                             pct(entry[key].get("mfu")), ratio(tps, plain), ratio(tps, trainer),
                             ratio(best, best_trainer)])
        compiled = entry.get("largeforge_compile", {})
        if "compile_s" in compiled:
            section.notes.append(
                f"`train.compile`, {precision}: {ratio(compiled['tokens_per_s'], entry.get('largeforge', {}).get('tokens_per_s'))} "  # noqa: E501
                f"the eager loop's tokens/s after about {compiled['compile_s']:.0f} s of "
                "compilation in the first step (with inductor's on-disk cache warm from "
                "earlier runs; a cold compile takes about 25 s here).")
        ours = entry.get("largeforge", {})
        best = "best_round_" if "best_round_ratio_to_trainer" in ours else ""
        if trainer:
            section.targets.append(Target(
                f"largeforge train vs Trainer, {precision}{', best rounds' if best else ''}",
                ours.get(f"{best}ratio_to_trainer"), 1.15))
        # The MFU target is against the measured fp32 matmul peak; in bf16 the
        # matmuls are a smaller share of a step, so the bf16 figure is reported, not judged.
        for key, label in (("largeforge", "largeforge train"),
                           ("largeforge_compile", "largeforge train, compile")):
            if key not in entry:
                continue
            mfu = entry[key].get(f"{best}mfu")
            if precision == "fp32":
                section.targets.append(Target(
                    f"{label} MFU, fp32{', best round' if best else ''}", mfu, 0.75, unit="%"))
            else:
                section.notes.append(
                    f"{label}, bf16: MFU {pct(mfu)}{' (best round)' if best else ''} of the "
                    "measured bf16 matmul peak, for information: the MFU target is set "
                    "against the fp32 peak.")
        profile = entry.get("profile")
        if profile:
            phases = ", ".join(f"{k} {v:,.0f} ms" for k, v in profile["phases_ms"].items())
            ops = ", ".join(f"`{k}` {v:,.0f} ms" for k, v in
                            list(profile["operators_ms"].items())[:6])
            section.notes.append(
                f"Profile, {precision} (torch.profiler, per step; the profiler adds overhead): "
                f"step {profile['step_ms_under_profiler']:,.0f} ms; {phases}. Matmul and "
                f"attention operators {profile['matmul_and_attention_ms']:,.0f} ms against "
                f"{profile['ideal_ms_at_peak']:,.0f} ms for the same FLOPs at the measured peak "
                f"(efficiency {pct(profile.get('matmul_efficiency'))}); other operators "
                f"{pct(profile.get('non_matmul_share'))} of operator time. Top operators: {ops}."
            )
    if rows:
        section.tables.append(("", ["loop", "tokens/s (median)", "best round", "MFU (median)",
                                    "vs plain", "vs Trainer", "best vs best Trainer"], rows))
        section.notes.insert(0, "Other work on the shared machine only slows a run down, so "
                             "each loop's fastest round is its least disturbed one; the targets "
                             "are judged on those (the medians are in the table too).")
    return section


def render_shakespeare(r: dict) -> Section:
    section = Section(
        "Char-level Tiny Shakespeare (`benchmarks/shakespeare_char.py`)",
        "nanoGPT's CPU baby-GPT setting (dim 128, 4 layers, 4 heads, block 64, batch 12, no "
        "dropout) with our Llama and a byte vocabulary; val loss over the last 10% of the text.",
    )
    curve = r.get("val_curve") or []
    iters = r.get("settings", {}).get("train", {}).get("max_steps")
    section.tables.append(("", ["", "value"], [
        ["iterations", num(iters)], ["final val loss", num(r.get("final_val_loss"), 4)],
        ["nanoGPT reports", num(r.get("nanogpt_val_loss"), 2)],
        ["parameters", num(r.get("parameters"))], ["precision", r.get("precision")],
        ["wall time", f"{num(r.get('wall_time_s'))} s"],
        ["median tokens/s", num(r.get("median_tokens_per_s"))],
        ["val curve", ", ".join(f"{s}: {v:.3f}" for s, v in curve)],
    ]))
    section.targets.append(Target(f"val loss at {num(iters)} iterations",
                                  r.get("final_val_loss"), 1.80, higher_is_better=False,
                                  unit=""))
    return section


def render_data(r: dict) -> Section:
    section = Section(
        f"Data pipeline (`benchmarks/data.py`{', --copies ' + str(r['copies']) if r.get('copies', 1) > 1 else ''})",  # noqa: E501
        f"Validate + tokenize {num(r.get('records'))} Alpaca records ({r.get('template')} "
        f"template, loss masks), median of {r.get('repeats')}.",
    )
    labels = {"one": "one process, record by record", "batched": "batched, 1 process",
              "batched2": "batched, 2 processes"}
    rows = [[labels.get(k, k), f"{v:.2f} s", num(r["records_per_s"][k]),
             f"{r['speedup_vs_one'][k]:.2f}x"] for k, v in r.get("median_wall_s", {}).items()]
    section.tables.append(("", ["path", "wall", "records/s", "vs one"], rows))
    return section


def render_finetune(r: dict) -> Section:
    section = Section(
        "Fine-tuning: full, LoRA, QLoRA (`benchmarks/finetune.py`)",
        f"The `base` preset, seq {r.get('seq_len')} x batch {r.get('batch_size')}, "
        f"{r.get('steps')} steps, each method in its own process; floor (imports only) "
        f"{num(r.get('floor_rss_mib'))} MiB.",
    )
    floor = r.get("floor_rss_mib") or 0
    rows = [[x["method"], x.get("precision"), num(x.get("trainable")), num(x.get("tokens_per_s")),
             num(x.get("peak_rss_mib")), num(x.get("training_rss_mib")),
             num((x.get("training_rss_mib") or 0) - floor)]
            for x in r.get("rows", []) if x.get("method") != "floor"]
    section.tables.append(("", ["method", "precision", "trainable", "tokens/s", "peak RSS MiB",
                                "training RSS MiB", "above floor"], rows))
    return section


def render_memory(r: dict) -> Section:
    section = Section(
        "Memory of training (`benchmarks/memory.py`)",
        "Peak RSS of fine-tuning the `base` preset (from `finetune.json`) and of a 1B-shaped "
        "Llama (dim 2048, 16 layers, 16 heads, SwiGLU 5632, vocabulary 32,000; seq "
        f"{r.get('seq_len')}, batch {r.get('batch_size')}) training with gradient "
        "checkpointing through our loop, each in its own process. Expected: 16 bytes per "
        "parameter (fp32 weights, gradients, two AdamW moments).",
    )
    rows = []
    base = r.get("finetune_base")
    if base:
        for x in base["rows"]:
            rows.append([f"base preset, {x['method']} ({x.get('precision')})",
                         num(x.get("total")), num(x.get("peak_rss_mib")),
                         num(x.get("training_rss_mib")),
                         num(x["training_rss_mib"] - base["floor_rss_mib"]), "-"])
    one_b = r.get("one_b", {})
    if "skipped" in one_b:
        section.notes.append(f"The 1B run was skipped: {one_b['skipped']}.")
    elif one_b:
        shape = "2-layer shape (quick)" if r.get("quick") else "1B shape"
        rows.append([f"{shape}, full, gradient checkpointing ({one_b.get('precision')})",
                     num(r.get("parameters")), num(one_b.get("peak_rss_mib")),
                     num(one_b.get("training_rss_mib")), num(one_b.get("above_floor_mib")),
                     num(r.get("expected_state_mib"))])
        section.notes.append(
            f"{shape}: {num(one_b.get('seconds_per_step'), 1)} s per step, "
            f"{num(one_b.get('tokens_per_s'), 1)} tokens/s; floor (imports only) "
            f"{num(r.get('floor_rss_mib'))} MiB; {num(one_b.get('above_expected_mib'))} MiB "
            "above the expected optimizer state (activations, buffers, allocator)."
        )
    section.tables.append(("", ["run", "parameters", "peak RSS MiB", "training RSS MiB",
                                "above floor", "expected MiB"], rows))
    return section


def render_inference(r: dict) -> Section:
    s = r.get("settings", {})
    section = Section(
        "Inference: decode and prefill (`benchmarks/inference.py`)",
        f"The `{s.get('preset')}` preset ({s.get('weights')} weights, vocabulary "
        f"{num(s.get('vocab_size'))}), greedy, {s.get('new_tokens')} new tokens, "
        f"{s.get('threads')} thread(s), median of {s.get('repeats')}; llama.cpp runs our F32 "
        "GGUF with an F32 KV cache.",
    )
    d, e, p = (r.get("decode_tokens_per_s", {}), r.get("end_to_end_tokens_per_s", {}),
               r.get("prefill_tokens_per_s", {}))
    hf = d.get("hf_b1")
    section.tables.append((f"Batch 1, decode (tokens after the first over their time); "
                           f"prompt {s.get('prompt_tokens_b1')} tokens",
                           ["path", "decode tokens/s", "vs transformers", "end-to-end tokens/s"],
                           [["largeforge generate", num(d.get("ours_b1")),
                             ratio(d.get("ours_b1"), hf), num(e.get("ours_b1"))],
                            ["largeforge loop, standard weight layout",
                             num(d.get("ours_b1_standard_layout")),
                             ratio(d.get("ours_b1_standard_layout"), hf), "-"],
                            ["transformers generate()", num(hf), "1.00x", num(e.get("hf_b1"))],
                            ["llama.cpp, F32 GGUF", num(d.get("llama_b1")),
                             ratio(d.get("llama_b1"), hf), num(e.get("llama_b1"))]]))
    section.tables.append((f"Batch {s.get('batch')}, all rows, prefill included",
                           ["path", "tokens/s", "vs transformers"],
                           [["largeforge engine (continuous batching)", num(e.get("ours_b8")),
                             ratio(e.get("ours_b8"), e.get("hf_b8"))],
                            ["transformers generate(), left-padded", num(e.get("hf_b8")),
                             "1.00x"]]))
    section.tables.append((f"Prefill of a {s.get('prefill_tokens')}-token prompt",
                           ["path", "prefill tokens/s", "vs transformers"],
                           [[k, num(v), ratio(v, p.get("hf"))] for k, v in p.items()]))
    section.targets.append(Target("decode vs transformers generate(), batch 1",
                                  r.get("ratios", {}).get("ours_vs_hf_decode_b1"), 1.2))
    prof = r.get("profile_b1")
    if prof:
        ops = ", ".join(f"`{k}` {v:.2f} ms" for k, v in list(prof["operators_ms"].items())[:5])
        llama = (f" llama.cpp's whole step takes {prof['llama_step_ms']:.2f} ms "
                 f"({prof['llama_weight_gb_per_s']:.1f} GB/s of weights)."
                 if prof.get("llama_step_ms") else "")
        section.notes.append(
            f"Profile of our batch-1 decode step (torch.profiler): "
            f"{prof['step_ms_under_profiler']:.2f} ms, of which matmuls "
            f"{prof['matmul_ms']:.2f} ms, reading {prof['weight_mib']:.0f} MiB of weights at "
            f"{prof.get('matmul_weight_gb_per_s') or 0:.1f} GB/s; "
            + (f"other operators {prof['other_operators_ms']:.2f} ms, outside the operators "
               f"(Python, module calls) {prof['outside_operators_ms']:.2f} ms; "
               if "other_operators_ms" in prof else "")
            + f"top operators: {ops}.{llama}")
    same = r.get("same_tokens", {})
    if same:
        section.notes.append("Greedy tokens equal: " + ", ".join(
            f"{k} {v if isinstance(v, bool) else f'{100 * v:.0f}%'}" for k, v in same.items()))
    return section


def render_serve(r: dict) -> Section:
    section = Section(
        "Serving (`benchmarks/serve.py`)",
        f"`serve inference` with `--threads {r.get('server_threads')}`, {r.get('prompts')} "
        f"prompts x {r.get('rounds')} rounds, {r.get('max_tokens')} tokens each, greedy, "
        "streamed through the official `openai` client on the same machine.",
    )
    one, many = r.get("one_client", {}), r.get("concurrent", {})
    rows = [[label, num(x.get("tokens_per_s")), ratio(x.get("tokens_per_s"),
                                                      one.get("tokens_per_s")),
             num(1e3 * x["ttft_p50_s"]) if "ttft_p50_s" in x else "-",
             num(1e3 * x["ttft_p99_s"]) if "ttft_p99_s" in x else "-"]
            for label, x in (("1 client, one request after another", one),
                             (f"{r.get('prompts')} clients at once", many))]
    section.tables.append(("", ["clients", "tokens/s", "vs one", "TTFT p50 ms", "TTFT p99 ms"],
                           rows))
    flood = r.get("flood")
    if flood:
        section.notes.append(
            f"{flood['requests']} requests at concurrency {flood['concurrency']}: statuses "
            f"{flood['statuses']}, {flood['requests_per_s']:.1f} requests/s, latency p50 "
            f"{1e3 * flood['latency_p50_s']:,.0f} ms, p99 {1e3 * flood['latency_p99_s']:,.0f} ms.")
    section.targets.append(Target(f"{r.get('prompts')} streams vs 1, aggregate tokens/s",
                                  r.get("ratio_concurrent_vs_one"), 5.0))
    return section


FRAMEWORK_LABELS = {"largeforge": "largeforge train sft",
                    "transformers": "transformers Trainer + peft", "trl": "TRL SFTTrainer"}
DECODE_LABELS = {"ours": "largeforge generate (fp32)", "hf": "transformers generate() (fp32)",
                 "llama_f16": "llama.cpp, F16 GGUF (our export)",
                 "llama_q4_k_m": "llama.cpp, Q4_K_M GGUF (quantised from that F16 file)",
                 "llama_q4_1": "llama.cpp, the package's Q4_1 GGUF"}


def render_real_model(r: dict) -> Section:
    s, data, dec = r.get("settings", {}), r.get("data", {}), r.get("decode", {})
    section = Section(
        "Real model (SmolLM2-135M-Instruct) (`benchmarks/real_model.py`)",
        f"SmolLM2-135M-Instruct, given to LargeForge as the GGUF file `{s.get('source')}` "
        "(imported once into an fp32 Hugging Face directory, which the other libraries load). "
        f"Fine-tuning: the Alpaca sample ({num(data.get('train_samples'))} training samples of "
        f"{num(data.get('records'))} records), the model's chat template, loss on the replies "
        f"only, seq {s.get('seq_len')}, batch {s.get('batch_size')} right-padded, "
        f"{s.get('steps')} steps, LoRA r {s.get('lora_r')} / alpha {s.get('lora_alpha')} / "
        f"dropout 0 on every linear layer, AdamW (0.9, 0.95), lr {s.get('lr')} cosine to "
        f"{s.get('min_lr_rate')}x without warm-up, clipping 1.0; QLoRA: NF4 with double "
        "quantisation (bitsandbytes on CPU). Every library sees the same samples in the same "
        "order (LargeForge's seeded, length-grouped order), each run in its own process. "
        "Tokens/s: padded batch tokens per optimizer step, median over the steps after the "
        f"first {s.get('warmup_steps_left_out')}; peak RSS includes loading, training RSS is "
        "the highest RSS in the second half of the run.",
    )
    runs = r.get("finetune", [])
    by = {(x["framework"], x["method"], x["precision"]): x for x in runs}
    rows = []
    for x in runs:
        label = FRAMEWORK_LABELS.get(x["framework"], x["framework"])
        if "error" in x:
            rows.append([label, x["method"], x["precision"], "failed: " + x["error"][:120],
                         "-", "-", "-", "-"])
            continue
        hf = by.get(("transformers", x["method"], x["precision"]), {})
        losses = x.get("losses") or []
        rows.append([label, x["method"], x["precision"], num(x.get("tokens_per_s")),
                     ratio(x.get("tokens_per_s"), hf.get("tokens_per_s")),
                     num(x.get("peak_rss_mib")), num(x.get("training_rss_mib")),
                     f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "-"])
    section.tables.append(("Fine-tuning", ["library", "method", "precision", "tokens/s",
                                           "vs Trainer", "peak RSS MiB", "training RSS MiB",
                                           "loss, first -> last step"], rows))
    agreement = r.get("loss_agreement", [])
    if agreement:
        section.tables.append((
            "Per-step training loss, library against library",
            ["method", "precision", "pair", "steps", "step 1 abs diff", "max abs diff",
             "mean abs diff"],
            [[c["method"], c["precision"],
              f"{FRAMEWORK_LABELS.get(c['a'], c['a'])} vs {FRAMEWORK_LABELS.get(c['b'], c['b'])}",
              c["steps"], _sci(c.get("first_step_abs_diff")), _sci(c.get("max_abs_diff")),
              _sci(c.get("mean_abs_diff"))] for c in agreement]))
    same = data.get("same_samples")
    if same is not None:
        matched = data.get("batches_match_largeforge", {})
        section.notes.append(
            f"Data: `apply_chat_template` with the prompt masked gives the same ids and labels "
            f"as LargeForge's renderer for {num(same)} of {num(data.get('train_samples'))} "
            f"samples; batches with LargeForge's token counts at every step: "
            f"{sum(bool(v) for v in matched.values())} of {len(matched)} runs.")
    worst = {}
    for c in agreement:
        if c.get("max_abs_diff") is not None:
            worst[c["precision"]] = max(worst.get(c["precision"], 0.0), c["max_abs_diff"])
    if worst:
        section.notes.append(
            "How close: the largest per-step loss difference between any two libraries is "
            + ", ".join(f"{v:.1e} in {k}" for k, v in worst.items())
            + ". The runs share the model, the batches, the LoRA initialisation (seed 1337, "
            "drawn after loading), the optimizer (fused AdamW, the Trainer's default too) and "
            "the schedule, so what is left is the order of floating-point operations: LargeForge "
            "fuses the output layer with the loss (chunked `linear_cross_entropy`), the Trainer "
            "computes the full logits and then the loss, TRL its own fused log-probabilities. "
            "Under bf16 autocast each rounding is about 1e-2 relative, so there the curves move "
            "apart a little with every step, while fp32 stays at rounding level.")
    d = dec.get("decode_tokens_per_s", {})
    if d:
        agree = dec.get("agreement_with_hf", {})
        section.tables.append((
            f"Decode, batch 1: {dec.get('new_tokens')} new tokens after a "
            f"{dec.get('prompt_tokens')}-token chat prompt, greedy, {dec.get('threads')} "
            f"threads, median of {dec.get('rounds')}",
            ["path", "decode tokens/s", "vs transformers", "file MiB",
             "greedy tokens equal to transformers'"],
            [[DECODE_LABELS.get(k, k), num(v), ratio(v, d.get("hf")),
              num(dec.get("file_mib", {}).get(k)),
              "-" if k == "hf" else f"{100 * agree.get(k, 0):.0f}% of the tokens"]
             for k, v in d.items()]))
        section.notes.append(
            "Decode tokens/s counts the tokens after the first over their time (prefill out); "
            "llama.cpp runs with its default F16 KV cache. Q4_K_M is `largeforge export --dtype "
            "q4_k_m`: llama.cpp's own quantizer (`llama_model_quantize`) from the F16 export. "
            "Agreement is the share of "
            "tokens before the first one that differs from `generate()`'s.")
        if dec.get("q4_k_m_fallback_tensors"):
            section.notes.append(
                f"Q4_K_M on this model: llama.cpp writes {dec['q4_k_m_fallback_tensors']} "
                "tensors in a fallback type (Q5_0, or Q8_0 where Q4_K_M asks for Q6_K), because "
                "their rows (576 values) are not a multiple of the 256-value K-quant block; only "
                "the 1536-wide FFN down projections are K-quants, so the file is larger than a "
                "true 4.5-bit Q4_K_M would be.")
        if dec.get("q4_k_m_perplexity_ratio"):
            section.notes.append(
                f"Q4_K_M perplexity / F16 perplexity (llama.cpp, the export's own report): "
                f"{dec['q4_k_m_perplexity_ratio']:.4f}.")
    versions = r.get("versions", {})
    if versions:
        section.notes.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()
                                                      if v) + ".")
    return section


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def render_generic(name: str, r: dict) -> Section:
    rows = [[k, num(v, 3) if isinstance(v, float) else v] for k, v in r.items()
            if k not in ("benchmark", "machine") and isinstance(v, (int, float, str, bool))]
    return Section(f"{name} (`benchmarks/{name}.py`)", tables=[("", ["key", "value"], rows)])


RENDERERS: dict[str, Callable[[dict], Section]] = {
    "pretrain": render_pretrain, "shakespeare_char": render_shakespeare, "data": render_data,
    "data_x10": render_data, "finetune": render_finetune, "memory": render_memory,
    "inference": render_inference, "serve": render_serve, "real_model": render_real_model,
}


def renderer_for(name: str) -> Callable[[dict], Section]:
    if name in RENDERERS:
        return RENDERERS[name]
    if name.startswith("data_x"):  # data.py --copies N
        return render_data
    return lambda r: render_generic(name, r)


# --- the document ----------------------------------------------------------------------------


def load_results(results_dir: Path) -> dict[str, dict]:
    """Every `*.json` in `results_dir` by benchmark name, in the report's order."""
    found: dict[str, dict] = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
        found[str(data.get("benchmark", path.stem))] = data
    ranked = sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    return {name: found[name] for name in ranked}


def machine_line(r: dict) -> str:
    m = r.get("machine", {})
    return (f"Run {m.get('date', '?')} on {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
            f"{m.get('torch_threads', '?')} torch threads; Python {m.get('python', '?')}, "
            f"torch {m.get('torch', '?')}, transformers {m.get('transformers', '?')}.")


def is_quick(r: dict) -> bool:
    return bool(r.get("quick") or r.get("settings", {}).get("quick"))


def target_row(target: Target, quick: bool) -> list[str]:
    row = target.row()
    return row[:-1] + ["not judged: a quick run"] if quick else row


def render(results: dict[str, dict]) -> str:
    """The whole Markdown document for `results` (name -> parsed JSON)."""
    sections = [(name, renderer_for(name)(r), r) for name, r in results.items()]
    out = ["# Benchmarks", "",
           "Generated by `python -m benchmarks` (or `python benchmarks/report.py`) from "
           "`benchmarks/results/*.json`; each JSON file holds the machine, the settings and "
           "every number quoted here. Ratios are measured in one run on one machine; the "
           "machine is shared, so each section gives its date, and the load average where "
           "the benchmark records it.", ""]
    targets = [(name, t, is_quick(r)) for name, section, r in sections for t in section.targets]
    if targets:
        out += ["## Targets", "",
                md_table(["benchmark", "target", "goal", "measured", "verdict"],
                         [[name, *target_row(t, quick)] for name, t, quick in targets]), ""]
    out += ["## Runs", "", md_table(
        ["benchmark", "date", "cpu", "cores", "threads", "torch", "transformers"],
        [[name, r.get("machine", {}).get("date", "-"), r.get("machine", {}).get("cpu", "-"),
          r.get("machine", {}).get("cores", "-"), r.get("machine", {}).get("torch_threads", "-"),
          r.get("machine", {}).get("torch", "-"), r.get("machine", {}).get("transformers", "-")]
         for name, r in results.items()]), ""]
    for _name, section, r in sections:
        out += [f"## {section.title}", ""]
        if is_quick(r):
            out += ["**A quick smoke run (`--quick`): these numbers are not representative.**",
                    ""]
        if section.text:
            out += [section.text, ""]
        out += [machine_line(r), ""]
        load = r.get("load_average_1min")
        if load:
            out += [f"Load average (1 min): {load['before']:.1f} before, "
                    f"{load['after']:.1f} after.", ""]
        for caption, header, rows in section.tables:
            if caption:
                out += [caption + ":", ""]
            out += [md_table(header, rows), ""]
        if section.targets:
            out += [md_table(["target", "goal", "measured", "verdict"],
                             [target_row(t, is_quick(r)) for t in section.targets]), ""]
        for note in section.notes:
            out += [note, ""]
    return "\n".join(out).rstrip() + "\n"


def write_report(results_dir: Path = RESULTS, output: Path = OUTPUT) -> Path:
    """Render the results in `results_dir` to `output` (written whole, then renamed)."""
    results = load_results(results_dir)
    if not results:
        raise ReportError(f"no benchmark results (*.json) in {results_dir}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    partial.write_text(render(results), encoding="utf-8")
    partial.replace(output)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        parser.error(f"--results {args.results} is not a directory")
    try:
        print(f"wrote {write_report(args.results, args.output)}")
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
