"""The benchmark runner and report (`python -m benchmarks`, `benchmarks/report.py`) on the real
result files, and the decoding speed-ups they measure: the decode weight layout and the engine's
batched prefill keep every token the same."""

from __future__ import annotations

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
from largeforge.inference.engine import ContinuousBatchingEngine, GenerationRequest
from largeforge.inference.generate import (
    load_for_inference,
    model_eos_ids,
    use_decode_layout,
    use_standard_layout,
)

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
    if "serve" in results:  # the targets, with the measured value and the verdict
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
        "serve"]
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
