"""Damaged model files (issue 18, class 2): a truncated, garbage, empty or mis-shaped
model.safetensors, config.json, generation_config.json, tokenizer file, LoRA adapter, GGUF file
or checkpoint is one `error:` line that names the file and says what to do, with exit code 2,
no traceback, nothing new on disk and the input unchanged, whichever command reads it; with the
file restored the same command succeeds (no --overwrite needed).

The commands run in this process (`largeforge.cli.main.main`: the entry point but for the
interpreter's start, which costs seconds a command), under the contract `cli_contract.refused`
checks; `serve` runs as a real subprocess, through `cli_contract.refused` itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import tiny_models
from cli_contract import refused, snapshot
from largeforge.cli.main import main as cli_main
from largeforge.damaged_files import DamagedFileError
from largeforge.errors import LargeForgeError

TEXT = "Once upon a time there was a little fox who lived in the forest.\n" * 40
RECORDS = [{"instruction": "Say where the fox lived.", "input": "", "output": "In the forest."},
           {"instruction": "Name the animal.", "input": "", "output": "A little fox."}] * 8


# --- fixtures: a tiny model, adapter, GGUF file and two runs per module -------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import LoraConfig, get_peft_model

    from largeforge.export.gguf import export_gguf

    root = tmp_path_factory.mktemp("assets")
    tokenizer = tiny_models.make_tokenizer([TEXT])
    model = tiny_models.make_model(len(tokenizer), 256)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
                   ).save_pretrained(root / "adapter")
    tokenizer.save_pretrained(root / "adapter")  # as a LoRA run saves it
    export_gguf(str(root / "model"), root / "model.gguf", dtype="f32")
    (root / "small.txt").write_text(TEXT, encoding="utf-8")
    (root / "alpaca.json").write_text(json.dumps(RECORDS), encoding="utf-8")
    (root / "prompts.jsonl").write_text('{"id": 1, "prompt": "Once"}\n', encoding="utf-8")
    return root


def workspace(assets: Path, where: Path) -> Path:
    """A copy of the assets in `where`, its adapter naming the copied model as its base."""
    shutil.copytree(assets, where, dirs_exist_ok=True)
    config_file = where / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(where / "model")
    config_file.write_text(json.dumps(config), encoding="utf-8")
    return where


PRETRAIN = ["train", "--data", "small.txt", "--preset", "tiny", "--max-steps", "2",
            "--set", "tokenizer.vocab_size=300", "--set", "data.seq_len=16",
            "--set", "model.dim=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
            "--set", "model.n_kv_heads=1", "--set", "train.batch_size=2",
            "--set", "train.eval_every=1", "--set", "train.save_every=1",
            "--output-dir", "runs", "--name", "r"]


LORA = ["train", "sft", "--model", "model", "--dataset", "alpaca.json", "--max-steps", "2",
        "--seq-len", "256", "--batch-size", "2", "--method", "lora",
        "--set", "train.eval_every=1", "--set", "train.save_every=1", "--output", "runs/l"]
RUNS = {"r": PRETRAIN, "l": LORA}


@pytest.fixture(scope="module")
def trained(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two finished runs with checkpoints step-1 and step-2, to resume: runs/r pretrained a
    model, runs/l trained a LoRA adapter on the assets' model."""
    root = tmp_path_factory.mktemp("trained")
    for name in ("small.txt", "alpaca.json", "model"):
        (shutil.copytree if name == "model" else shutil.copy)(assets / name, root / name)
    for args in RUNS.values():
        code, out, err = cli(root, *args)
        assert code == 0, (out, err)
    return root


# --- the contract, in this process ------------------------------------------------------------


def cli(cwd: Path, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process in `cwd`: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(args))
    return code, out.getvalue(), err.getvalue()


def refused_here(cwd: Path, *args: str) -> str:
    """`cli_contract.refused` in this process: exit 2, one `error:` line, no traceback (an
    uncaught exception would fail the test), nothing changed under `cwd`."""
    before = snapshot(cwd)
    code, out, err = cli(cwd, *args)
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert snapshot(cwd) == before, "the failed command changed files"
    return errors[0]


def succeeds_here(cwd: Path, *args: str) -> None:
    code, out, err = cli(cwd, *args)
    assert code == 0, (out, err)


# --- kinds of damage ---------------------------------------------------------------------------


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 8)


def empty(path: Path) -> None:
    path.write_bytes(b"")


def bad_json(path: Path) -> None:
    path.write_text('{"peft_type": "LORA", "r": ', encoding="utf-8")


def wrong_shape(path: Path) -> None:
    path.write_text("[1, 2, 3]\n", encoding="utf-8")


def drop_tensor(path: Path) -> None:
    tensors = load_file(path)
    tensors.pop(sorted(tensors)[-1])
    save_file(tensors, path, metadata={"format": "pt"})


Damage = Callable[[Path], None]

GENERATE = ["generate", "--model", "model", "--prompt", "Once", "--max-new-tokens", "2"]
EVAL = ["eval", "--model", "model", "--data", "small.txt", "--max-examples", "2"]
INFER = ["infer", "--model", "model", "--input", "prompts.jsonl", "--output", "out.jsonl",
         "--max-new-tokens", "2"]
SFT = ["train", "sft", "--model", "model", "--dataset", "alpaca.json", "--max-steps", "1",
       "--seq-len", "256", "--batch-size", "2", "--output", "runs/sft"]
COMPARE = ["compare", "--models", "model", "adapter", "--data", "small.txt", "--metrics",
           "perplexity", "--max-examples", "2", "--output", "report.html"]

# (damaged file in the workspace, damage, command)
CASES: dict[str, tuple[str, Damage, list[str]]] = {
    "generate, truncated weights": ("model/model.safetensors", truncate, GENERATE),
    "generate, garbage tokenizer.json": ("model/tokenizer.json", garbage, GENERATE),
    "generate, truncated GGUF": (
        "model.gguf", truncate, ["generate", "--model", "model.gguf", "--prompt", "Once",
                                 "--max-new-tokens", "2"]),
    "eval, truncated config.json": ("model/config.json", truncate, EVAL),
    "eval, generation_config.json a list": ("model/generation_config.json", wrong_shape, EVAL),
    "infer, empty tokenizer_config.json": ("model/tokenizer_config.json", empty, INFER),
    "export hf, weights short of a tensor": (
        "model/model.safetensors", drop_tensor, ["export", "model", "-f", "hf", "-o", "out"]),
    "export gguf, garbage weights": (
        "model/model.safetensors", garbage, ["export", "model", "-f", "gguf", "-o", "m.gguf",
                                             "--dtype", "f32"]),
    "export onnx, truncated tokenizer.json": (
        "model/tokenizer.json", truncate, ["export", "model", "-f", "onnx", "-o", "onnx"]),
    "export torchscript, empty config.json": (
        "model/config.json", empty, ["export", "model", "-f", "torchscript", "-o", "ts"]),
    "export ollama, truncated adapter": (
        "adapter/adapter_model.safetensors", truncate,
        ["export", "adapter", "-f", "ollama", "-o", "ollama", "--dtype", "f32"]),
    "merge, broken adapter_config.json": (
        "adapter/adapter_config.json", bad_json, ["merge", "--adapter", "adapter", "-o", "m"]),
    "merge, adapter short of a tensor": (
        "adapter/adapter_model.safetensors", drop_tensor,
        ["merge", "--adapter", "adapter", "-o", "m"]),
    "merge, adapter's tokenizer.json a list": (
        "adapter/tokenizer.json", wrong_shape, ["merge", "--adapter", "adapter", "-o", "m"]),
    "train sft, truncated base weights": ("model/model.safetensors", truncate, SFT),
    "train sft lora, base config.json a list": (
        "model/config.json", wrong_shape, [*SFT, "--method", "lora"]),
    "compare, empty adapter weights": ("adapter/adapter_model.safetensors", empty, COMPARE),
    "import, empty GGUF": ("model.gguf", empty, ["import", "model.gguf", "-o", "imported"]),
    "import, garbage GGUF": ("model.gguf", garbage, ["import", "model.gguf", "-o", "imported"]),
}


# Refused only: the restored export takes 12 s of ONNX tracing (tests/test_export_onnx.py runs
# the same export).
NOT_RERUN = {"export onnx, truncated tokenizer.json"}


def check_line(line: str, damaged: str) -> None:
    """The line names the damaged file and says what to do."""
    assert damaged in line and "is damaged" in line, line
    assert "restore" in line or "again" in line, line


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_file_is_named_and_the_restored_file_works(case: str, assets: Path,
                                                              tmp_path: Path) -> None:
    damaged, damage, args = CASES[case]
    work = workspace(assets, tmp_path)
    path = work / damaged
    original = path.read_bytes()
    damage(path)
    check_line(refused_here(work, *args), damaged)
    path.write_bytes(original)
    if case not in NOT_RERUN:
        succeeds_here(work, *args)


def test_a_truncated_real_gguf_is_named(tmp_path: Path) -> None:
    """SmolLM2's GGUF file cut short, as an interrupted download leaves it."""
    from conftest import smollm2_gguf

    real = smollm2_gguf()
    cut = tmp_path / real.name
    with real.open("rb") as source:
        cut.write_bytes(source.read(real.stat().st_size // 3))
    # (`generate --model FILE.gguf` reads it the same way: the tiny GGUF cases above)
    line = refused_here(tmp_path, "import", cut.name, "-o", "imported")
    check_line(line, f"{cut.name} is damaged (truncated")


# --- resuming from a damaged checkpoint --------------------------------------------------------


@pytest.mark.parametrize("run, damaged, damage", [
    ("r", "training_state.pt", truncate), ("r", "model.safetensors", garbage),
    ("r", "tokenizer.json", wrong_shape), ("l", "adapter_model.safetensors", drop_tensor),
])
def test_resume_from_a_damaged_checkpoint_names_an_earlier_one(trained: Path, tmp_path: Path,
                                                               run: str, damaged: str,
                                                               damage: Damage) -> None:
    work = shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    checkpoints = Path("runs") / run / "checkpoints"
    damage(work / checkpoints / "step-2" / damaged)
    line = refused_here(work, *RUNS[run], "--resume")
    check_line(line, f"step-2/{damaged}")
    earlier = str(checkpoints / "step-1")
    assert f"resume from an earlier checkpoint (--resume {earlier})" in line
    succeeds_here(work, *RUNS[run], "--resume", earlier)  # what the line says to do


# --- serve refuses at start-up, in a real process; the library raises the same error ----------


def test_serve_refuses_a_damaged_model_at_start_up(assets: Path, tmp_path: Path) -> None:
    from serve_helpers import start_server

    work = workspace(assets, tmp_path)
    weights = work / "model" / "model.safetensors"
    original = weights.read_bytes()
    truncate(weights)
    line = refused(work, "serve", "inference", "--model", "model", "--port", "0")
    check_line(line, "model/model.safetensors")
    weights.write_bytes(original)
    start_server(work / "model", work / "serve.log").stop()  # it starts, and answers /health


def test_the_library_raises_the_same_error(assets: Path, tmp_path: Path) -> None:
    import largeforge

    work = workspace(assets, tmp_path)
    wrong_shape(work / "model" / "generation_config.json")
    with pytest.raises(DamagedFileError, match="generation_config.json is damaged") as caught:
        largeforge.load_model(work / "model")
    assert isinstance(caught.value, LargeForgeError)
    assert caught.value.path == work / "model" / "generation_config.json"


def test_damaged_pickled_weights_and_hub_cache_files(assets: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from huggingface_hub import constants

    from largeforge.models import load_model
    from largeforge.tokenizer import load_tokenizer

    pickled = shutil.copytree(assets / "model", tmp_path / "pickled")
    tensors = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(tensors, pickled / "pytorch_model.bin")
    truncate(pickled / "pytorch_model.bin")
    with pytest.raises(DamagedFileError) as caught:
        load_model(pickled)
    assert caught.value.path == pickled / "pytorch_model.bin"

    # A hub id whose files in the local Hugging Face cache are damaged: the cached file is named.
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(assets / "model", snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    truncate(snapshot / "model.safetensors")
    empty(snapshot / "tokenizer_config.json")
    for load, damaged in ((load_model, "model.safetensors"),
                          (load_tokenizer, "tokenizer_config.json")):
        with pytest.raises(DamagedFileError, match="Hugging Face cache") as caught:
            load("tiny-org/tiny")
        assert caught.value.path == snapshot / damaged
