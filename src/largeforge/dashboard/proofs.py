"""The proof that an export works: the artifact loaded in the runtime it is for, run on a
prompt, and compared with the model it came from. `python -m largeforge.dashboard.proofs FORMAT
PATH SOURCE` prints one JSON object; the dashboard runs it after each export, in a process of
its own (it loads torch, transformers and the runtime).

    hf, torchscript, onnx  the next-token logits of the prompt, from transformers /
                           torch.jit / onnxruntime, against the source model's: the largest
                           difference, and whether the greedy next token agrees
    gguf, ollama           llama.cpp (llama-cpp-python) continues the prompt greedily; where
                           it is not installed, gguf-py reads the file (said as such: parsed,
                           not run)
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PROMPT = "The quick brown fox"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def _source_logits(source: str, ids: list[int]) -> Any:
    import torch

    from largeforge.models import load_model
    from largeforge.runs import resolve_model_dir

    model = load_model(resolve_model_dir(source), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()


def _prompt_ids(tokenizer_dir: Path) -> list[int]:
    from largeforge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir))
    return list(tokenizer(PROMPT, add_special_tokens=False)["input_ids"]) or [0]


def _compare(runtime: str, logits: Any, source: str, ids: list[int]) -> dict[str, Any]:
    import torch

    reference = _source_logits(source, ids)
    logits = torch.as_tensor(logits).float().reshape(-1)
    diff = float((logits - reference).abs().max())
    agree = int(logits.argmax()) == int(reference.argmax())
    return {"ok": agree, "runtime": runtime, "max_abs_diff": diff, "next_token_agrees": agree,
            "detail": f"{runtime} ran it on {PROMPT!r}: next-token logits within {diff:.2e} of "
                      f"the source model's; greedy next token "
                      f"{'agrees' if agree else 'differs'}"}


def prove_hf(path: Path, source: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    ids = _prompt_ids(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    return _compare(f"transformers {_version('transformers')}", logits, source, ids)


def prove_torchscript(path: Path, source: str) -> dict[str, Any]:
    import torch

    ids = _prompt_ids(path)
    module = torch.jit.load(str(path / "model.pt"))
    with torch.no_grad():
        logits = module(torch.tensor([ids]))[0, -1]
    return _compare(f"torch.jit {torch.__version__}", logits, source, ids)


def prove_onnx(path: Path, source: str) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    ids = _prompt_ids(path)
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds: dict[str, Any] = {}
    for spec in session.get_inputs():
        if spec.name == "input_ids":
            feeds[spec.name] = np.array([ids], dtype=np.int64)
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones((1, len(ids)), dtype=np.int64)
        elif spec.name == "position_ids":
            feeds[spec.name] = np.arange(len(ids), dtype=np.int64)[None]
        else:  # an empty past key/value cache: [batch, heads, 0, head_dim]
            shape = [1 if d == "batch" else 0 if isinstance(d, str) else d for d in spec.shape]
            feeds[spec.name] = np.zeros(shape, dtype=np.float32)
    logits = session.run(["logits"], feeds)[0][0, -1]
    return _compare(f"onnxruntime {ort.__version__}", logits, source, ids)


def prove_gguf(path: Path, source: str) -> dict[str, Any]:
    gguf_file = path / "model.gguf" if path.is_dir() else path
    try:
        import llama_cpp
    except ImportError:
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf_file))
        return {"ok": True, "runtime": f"gguf-py {_version('gguf')} (parsed, not run)",
                "detail": f"gguf-py read {len(reader.tensors)} tensors; install "
                          "llama-cpp-python to run it in llama.cpp"}
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=128, n_threads=1, verbose=False)
    try:
        out = llm.create_completion(PROMPT, max_tokens=8, temperature=0.0)
    finally:
        llm.close()
    text = out["choices"][0]["text"]
    return {"ok": True, "runtime": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
            "sample": text, "detail": f"llama.cpp loaded it and continued {PROMPT!r} with "
                                      f"{text!r}"}


PROOFS = {"hf": prove_hf, "torchscript": prove_torchscript, "onnx": prove_onnx,
          "gguf": prove_gguf, "ollama": prove_gguf}


def main(argv: list[str]) -> int:
    fmt, path, source = argv
    try:
        result = PROOFS[fmt](Path(path), source)
    except Exception as exc:  # noqa: BLE001 - the proof failed: that is its finding
        result = {"ok": False, "runtime": fmt, "detail": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
