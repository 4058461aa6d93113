"""Every logged number of small fixed-seed training runs: pretraining, SFT (full and LoRA), DPO,
ORPO and distillation, through the library's `train`.

`tests/test_loss_identity.py` compares them with `tests/data/loss_reference.json`, written by
this script before the training loop became the phased `Trainer` (issue 17): a refactor of the
loop must leave every loss bit-identical. To write the reference from another commit:

    git worktree add /tmp/base <commit>
    PYTHONPATH=/tmp/base/src:tests python tests/loss_fingerprint.py > tests/data/loss_reference.json
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

from sft_tasks import CHAT_SPECIALS, reverse_task, task_texts
from tiny_models import make_family_model, make_tokenizer

TRAIN = {"batch_size": 4, "max_steps": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 4,
         "eval_batches": 2, "log_every": 1, "seed": 7, "threads": 1}


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _pairs(n: int) -> list[dict[str, str]]:
    """Preference pairs: the reversed words are preferred to the words as given."""
    pairs = []
    for record in reverse_task(n, seed=3):
        prompt, answer = (m["content"] for m in record["messages"])
        pairs.append({"prompt": prompt, "chosen": " " + answer, "rejected": " " + prompt})
    return pairs


def _pretrain_text() -> str:
    rng = random.Random(0)
    words = " ".join(task_texts()).split()
    return "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(400))


def _runs(root: Path) -> dict[str, dict[str, Any]]:
    """name -> recipe mapping for each run."""
    tokenizer = make_tokenizer(task_texts(), *CHAT_SPECIALS)
    base = root / "base"
    make_family_model("llama", tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    teacher = root / "teacher"
    make_family_model("llama", tokenizer, seed=1).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    text = root / "corpus.txt"
    text.write_text(_pretrain_text(), encoding="utf-8")
    chats = _write_jsonl(root / "chats.jsonl", reverse_task(48, seed=1))
    prefs = _write_jsonl(root / "prefs.jsonl", _pairs(40))

    def recipe(name: str, data: Path, model: dict, **train: Any) -> dict[str, Any]:
        data_keys = {"chat_template": "chatml"} if "from_pretrained" in model else {}
        return {"model": model, "data": {"train": [str(data)], "seq_len": 32, **data_keys},
                "train": {**TRAIN, **train}, "output": {"dir": str(root / "runs"), "name": name}}

    pretrained = {"from_pretrained": str(base)}
    tiny = {"preset": "tiny", "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
            "hidden_dim": 64, "max_seq_len": 64}
    return {
        "pretrain": {**recipe("pretrain", text, tiny), "tokenizer": {"vocab_size": 300}},
        "sft_full": recipe("sft_full", chats, pretrained),
        "sft_lora": recipe("sft_lora", chats, pretrained, method="lora"),
        "dpo": recipe("dpo", prefs, pretrained, objective="dpo"),
        "orpo": {**recipe("orpo", prefs, pretrained, objective="orpo", method="lora")},
        "distill": {**recipe("distill", chats, pretrained, objective="distill"),
                    "distill": {"teacher": str(teacher)}},
    }


def fingerprint() -> dict[str, list[dict[str, float]]]:
    """run name -> its metrics.jsonl records, without the timing fields."""
    from largeforge import train
    from largeforge.config import load_recipe

    timing = {"tokens_per_s", "mfu", "time", "elapsed_s"}
    out: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, recipe in _runs(Path(tmp)).items():
            from rich.console import Console

            train(load_recipe(recipe, environ={}), sft=name.startswith("sft"),
                  console=Console(quiet=True))
            lines = (Path(tmp) / "runs" / name / "metrics.jsonl").read_text().splitlines()
            out[name] = [{k: v for k, v in json.loads(line).items() if k not in timing}
                         for line in lines]
    return out


def library_versions() -> dict[str, str]:
    """What the losses' last bits depend on: the libraries (transformers 5.25 moved step-1
    losses by about 1e-5) and the CPU (MKL picks its kernels by instruction set: the same
    libraries give other last bits on an AMX Xeon than on an AMD EPYC)."""
    from importlib.metadata import version

    versions = {name: version(name) for name in ("torch", "transformers", "tokenizers", "peft")}
    return {**versions, "cpu": cpu_model()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


if __name__ == "__main__":
    json.dump({"versions": library_versions(), **fingerprint()}, sys.stdout, indent=1)
    print()
