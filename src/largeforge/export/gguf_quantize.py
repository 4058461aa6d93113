"""Quantised GGUF through llama.cpp's own quantizer, with the perplexity it costs.

`llama_model_quantize` (llama-cpp-python) is what `llama-quantize` runs: it writes the K-quants
(Q4_K_M, Q5_K_M, Q6_K: the types Ollama users pull), with llama.cpp's per-tensor choices
(Q4_K_M keeps half of the attention V and FFN down matrices at Q6_K; rows that are not a
multiple of 256 fall back to a legacy type), and Q8_0 / Q4_0 as llama.cpp makes them. A
quantised file is made the way llama.cpp's docs say: the model is first written as F16, then
quantised. The numpy quantiser of `gguf.quants` has no K-quants, so it stays only as the
fallback for Q8_0 and Q4_0 where llama-cpp-python is not installed.

Every quantised file gets `quantization_report(...)`: the perplexity of the F16 file and of
the quantised one, measured by llama.cpp itself on the same text (the Python documentation that
ships with the interpreter unless `eval_text` is given), and their ratio, written as JSON beside
the file (`<name>.perplexity.json`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from largeforge.errors import LargeForgeError

# Our name -> llama.cpp's `LLAMA_FTYPE_*` constant.
LLAMA_CPP_FTYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")
INSTALL_HINT = "pip install llama-cpp-python (it compiles llama.cpp: about 5 minutes on 2 cores)"

# Perplexity: windows of PPL_CONTEXT tokens, at most PPL_MAX_TOKENS in all (a few seconds for
# a 135M model on 2 cores; enough to tell Q4_K_M from Q8_0).
PPL_CONTEXT = 512
PPL_MAX_TOKENS = 2048
DEFAULT_TEXT_CHARS = 12_000


@dataclass
class QuantizationReport:
    dtype: str
    perplexity_f16: float
    perplexity: float
    ratio: float  # perplexity / perplexity_f16
    tokens: int  # tokens scored
    text: str  # where the text came from
    quantizer: str = "llama.cpp llama_model_quantize"

    def summary(self) -> str:
        return (f"perplexity {self.perplexity:.4f} ({self.dtype}) vs {self.perplexity_f16:.4f} "
                f"(f16) on {self.tokens} tokens: ratio {self.ratio:.4f}")


def llama_cpp_or_none() -> Any:
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def needs_llama_cpp(dtype: str) -> bool:
    """Whether `dtype` is quantised by llama.cpp (always, when llama-cpp-python is there)."""
    if dtype in K_QUANTS:
        return True
    return dtype in LLAMA_CPP_FTYPES and llama_cpp_or_none() is not None


def require_llama_cpp(dtype: str) -> Any:
    llama_cpp = llama_cpp_or_none()
    if llama_cpp is None:
        raise LargeForgeError(
            f"GGUF type {dtype} is made by llama.cpp's quantizer, which needs llama-cpp-python: "
            f"{INSTALL_HINT}"
        )
    return llama_cpp


def report_path(gguf_file: Path) -> Path:
    """Where the perplexity report of `gguf_file` goes: `<stem>.perplexity.json` beside it."""
    return gguf_file.with_name(f"{gguf_file.stem}.perplexity.json")


@contextmanager
def quiet_llama_cpp() -> Iterator[list[str]]:
    """llama.cpp writes every tensor it quantises, its fallbacks and its context set-up to
    file descriptor 2 from C, past Python's `sys.stderr`: for the duration of the block that
    descriptor goes to a temporary file, whose last lines the block receives (in the list it
    yields, filled on exit) to put in an error message."""
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.extend(sink.read().decode("utf-8", "replace").splitlines()[-5:])


def quantize_file(source: Path, target: Path, dtype: str) -> None:
    """Quantise the F16 GGUF `source` into `target` with llama.cpp."""
    llama_cpp = require_llama_cpp(dtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_FTYPES[dtype])
    params.nthread = os.cpu_count() or 1
    with quiet_llama_cpp() as log:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(),
                                                params)
    if status != 0:
        raise LargeForgeError(f"llama.cpp could not quantise {source} to {dtype} (status "
                              f"{status}): {' | '.join(log)}")


def default_text() -> tuple[str, str]:
    """(text, its name): the start of the interpreter's own documentation, always present."""
    from largeforge.quickstart_corpus import iter_python_docs

    parts: list[str] = []
    size = 0
    for doc in iter_python_docs():
        parts.append(doc)
        size += len(doc)
        if size >= DEFAULT_TEXT_CHARS:
            break
    return "\n\n".join(parts)[:DEFAULT_TEXT_CHARS], "builtin:python-docs"


def perplexity(gguf_file: Path, text: str, *, context: int = PPL_CONTEXT,
               max_tokens: int = PPL_MAX_TOKENS) -> tuple[float, int]:
    """(perplexity, tokens scored) of `text` under the GGUF model, computed by llama.cpp in
    disjoint windows of `context` tokens (the first token of each window is not scored)."""
    llama_cpp = require_llama_cpp("perplexity")
    with quiet_llama_cpp():
        llm = llama_cpp.Llama(str(gguf_file), n_ctx=context, n_batch=context, logits_all=True,
                              n_threads=os.cpu_count() or 1, verbose=False)
    try:
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)[:max_tokens]
        nll, scored = 0.0, 0
        for start in range(0, len(tokens) - 1, context):
            window = tokens[start:start + context]
            if len(window) < 2:
                break
            llm.reset()
            llm.eval(window)
            logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
            top = logits.max(axis=1, keepdims=True)
            log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
            targets = np.asarray(window[1:])
            nll += float((log_z - logits[np.arange(len(targets)), targets]).sum())
            scored += len(targets)
    finally:
        llm.close()
    if scored == 0:
        raise LargeForgeError("the perplexity text is too short: it needs at least 2 tokens")
    return math.exp(nll / scored), scored


def quantization_report(f16_file: Path, quantized: Path, dtype: str,
                        eval_text: str | None = None, *, context: int = PPL_CONTEXT,
                        text_name: str = "--eval-text") -> QuantizationReport:
    """Measure both files on the same text, in windows of `context` tokens (at most the
    model's context length), and say what quantising cost."""
    if eval_text is None:
        eval_text, text_name = default_text()
    base, tokens = perplexity(f16_file, eval_text, context=context)
    quant, _ = perplexity(quantized, eval_text, context=context)
    return QuantizationReport(dtype=dtype, perplexity_f16=base, perplexity=quant,
                              ratio=quant / base, tokens=tokens, text=text_name)


def write_report(report: QuantizationReport, path: Path) -> Path:
    from largeforge.atomic_files import write_atomic_text

    write_atomic_text(path, json.dumps(asdict(report), indent=2) + "\n")
    return path


def read_report(gguf_file: Path) -> QuantizationReport | None:
    path = report_path(gguf_file)
    if not path.is_file():
        return None
    return QuantizationReport(**json.loads(path.read_text(encoding="utf-8")))
