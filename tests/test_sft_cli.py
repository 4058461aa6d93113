"""`largeforge train sft` from the command line: exact resume of LoRA and QLoRA runs killed with
SIGKILL, models from the local Hugging Face cache, and every bad input answered with exit code 2
and nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import checkpoint_reached, kill_cli_when, logged_losses, run_cli
from sft_tasks import CHAT_SPECIALS, split_task, task_texts
from tiny_models import make_family_model, make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(task_texts(), *CHAT_SPECIALS)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sft-cli")
    train, _ = split_task(400, 0)
    paths = {"messages": root / "train.jsonl", "text": root / "notes.txt",
             "prefs": root / "prefs.jsonl", "alpaca": root / "alpaca.json"}
    paths["messages"].write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
    paths["text"].write_text("Plain prose, the kind of text one pretrains on.\n" * 50)
    paths["prefs"].write_text(json.dumps({"prompt": "hi", "chosen": "hello", "rejected": "go"})
                              + "\n")
    paths["alpaca"].write_text(json.dumps([
        {"instruction": "Reverse the words.", "input": r["messages"][0]["content"],
         "output": r["messages"][1]["content"]} for r in train]), encoding="utf-8")
    for family in ("llama", "phi3"):
        directory = root / family
        make_family_model(family, tokenizer).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        paths[family] = directory
    return paths




@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_killed_adapter_run_resumes_exactly(method, files, tmp_path):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"from_pretrained": str(files["llama"])},
        "data": {"train": [str(files["messages"])], "chat_template": "chatml", "seq_len": 64},
        "lora": {"r": 8, "dropout": 0.1},  # dropout: the RNG state must resume too
        "train": {"method": method, "max_steps": 60, "batch_size": 8, "lr": 1e-2,
                  "eval_every": 10, "eval_batches": 2, "log_every": 1, "save_every": 4,
                  "precision": "fp32", "threads": 1},
    }))
    out = tmp_path / "runs"
    whole = run_cli("train", "sft", "--config", str(recipe), "--output", str(out / "whole"))
    assert whole.returncode == 0, whole.stderr

    kill_cli_when(["train", "sft", "--config", str(recipe), "--output", str(out / "killed")],
                  checkpoint_reached(out / "killed", 12), settle=0.05)
    killed = out / "killed"
    assert not (killed / "final").exists(), "the run finished before it was killed"
    # Adapter checkpoints: PEFT files, not a copy of the base model.
    step = sorted((killed / "checkpoints").glob("step-*"))[0]
    assert (step / "adapter_model.safetensors").is_file()
    assert not (step / "model.safetensors").exists()

    resumed = run_cli("train", "sft", "--config", str(recipe), "--output", str(killed),
                      "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert logged_losses(killed) == logged_losses(out / "whole")  # bit for bit
    a = load_file(out / "whole" / "final" / "adapter_model.safetensors")
    b = load_file(killed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_hub_id_is_found_in_the_local_cache(files, tmp_path):
    """A hub id resolves through the Hugging Face cache layout, offline."""
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for item in files["llama"].iterdir():
        (snapshot / item.name).write_bytes(item.read_bytes())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "run"
    proc = run_cli("train", "sft", "--model", "tiny-org/tiny-llama", "--dataset",
                   str(files["alpaca"]), "--output", str(out), "--max-steps", "2",
                   "--seq-len", "256", env=env)  # the Alpaca preamble is long in bytes
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-org/tiny-llama"
    # alpaca records on a model without a chat template: the Alpaca prompt format.
    assert "### Response" in (out / "final" / "chat_template.jinja").read_text()

    proc = run_cli("train", "sft", "--model", "tiny-org/not-cached", "--dataset",
                   str(files["alpaca"]), "--output", str(tmp_path / "none"), env=env)
    assert proc.returncode == 2
    assert "not in the local Hugging Face cache" in proc.stderr
    assert "huggingface-cli download" in proc.stderr


def bad(files: dict[str, Path], out: Path, *args: str) -> subprocess.CompletedProcess:
    proc = run_cli("train", "sft", "--output", str(out), "--seq-len", "64", *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert not out.exists(), "a failed start must write nothing"
    return proc


def test_target_modules_the_model_lacks_are_listed(files, tmp_path):
    proc = bad(files, tmp_path / "a", "--model", str(files["phi3"]), "--dataset",
               str(files["messages"]), "--chat-template", "chatml",
               "--target-modules", "q_proj,v_proj")
    err = " ".join(proc.stderr.split())
    assert "q_proj, v_proj not found in the phi3 model" in err
    assert "down_proj, gate_up_proj, o_proj, qkv_proj" in err


def test_a_model_directory_without_weights(files, tmp_path):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    for item in files["llama"].iterdir():
        if not item.name.endswith(".safetensors"):
            (empty / item.name).write_bytes(item.read_bytes())
    proc = bad(files, tmp_path / "a", "--model", str(empty), "--dataset",
               str(files["messages"]), "--chat-template", "chatml")
    assert "has no weights" in proc.stderr


@pytest.mark.parametrize("kind, message", [("text", "plain text"),
                                           ("prefs", "preference pairs")])
def test_a_dataset_that_is_not_for_sft(files, tmp_path, kind, message):
    proc = bad(files, tmp_path / "a", "--model", str(files["llama"]), "--dataset",
               str(files[kind]))
    assert message in " ".join(proc.stderr.split())


def test_chat_data_for_a_model_without_a_chat_template(files, tmp_path):
    proc = bad(files, tmp_path / "a", "--model", str(files["llama"]), "--dataset",
               str(files["messages"]))
    err = " ".join(proc.stderr.split())
    assert "has no chat template" in err and "--chat-template" in err and "chatml" in err


def test_other_bad_settings(files, tmp_path):
    proc = bad(files, tmp_path / "a", "--dataset", str(files["messages"]))
    assert "--model" in proc.stderr
    proc = bad(files, tmp_path / "b", "--model", str(files["llama"]), "--dataset",
               str(files["messages"]), "--method", "dora")
    assert "train.method" in proc.stderr
    # LoRA needs an existing model: not a pretraining recipe.
    proc = run_cli("train", "--data", str(files["text"]), "--set", "train.method=lora",
                   "--output-dir", str(tmp_path), "--name", "c")
    assert proc.returncode == 2 and "model.from_pretrained" in proc.stderr
    assert not (tmp_path / "c").exists()


def test_the_shipped_sft_recipe_runs(files, tmp_path, shared_data):
    """As its comment says: from a directory holding data/alpaca_sample.json."""
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "data").mkdir()
    shutil.copy(shared_data / "alpaca_sample.json", tmp_path / "data")
    out = tmp_path / "sft-lora"
    proc = run_cli("train", "sft", "--config", str(repo / "recipes" / "sft-lora.yaml"),
                   "--output", str(out), "--set", f"model.from_pretrained={files['llama']}",
                   "--max-steps", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_verify_only_checks_the_model_template_and_targets(files, tmp_path):
    common = ("train", "sft", "--model", str(files["phi3"]), "--dataset", str(files["messages"]),
              "--output", str(tmp_path / "v"), "--seq-len", "64", "--verify-only")
    ok = run_cli(*common, "--chat-template", "chatml")
    assert ok.returncode == 0 and "verified" in ok.stdout, ok.stderr
    assert run_cli(*common).returncode == 2  # no chat template
    wrong = run_cli(*common, "--chat-template", "chatml", "--target-modules", "q_proj")
    assert wrong.returncode == 2 and "qkv_proj" in wrong.stderr
    assert not (tmp_path / "v").exists()


def test_config_show_resolves_sft_defaults_and_their_origin():
    proc = run_cli("config", "show", "--sft", "--format", "json", "--set", "train.method=full")
    assert proc.returncode == 0, proc.stderr
    rows = {row["key"]: (row["value"], row["source"]) for row in json.loads(proc.stdout)}
    assert rows["train.method"] == ("full", "--set train.method=full")
    assert rows["train.lr"] == (2e-5, "train sft default (full)")  # a tenth of LoRA's
    assert rows["train.num_epochs"] == (3.0, "train sft default")
    assert rows["lora.target_modules"] == (["all-linear"], "default")


def test_default_sequence_length_fits_the_model(files):
    from largeforge.training.sft import resolve_sft_recipe

    resolved = resolve_sft_recipe(flags={"model.from_pretrained": str(files["llama"]),
                                         "data.train": [str(files["messages"])]}, environ={})
    assert resolved.recipe.data.seq_len == 256  # the tiny model's context, not 1024
    assert resolved.sources["data.seq_len"] == "train sft default (the model's context)"
    given = resolve_sft_recipe(flags={"model.from_pretrained": str(files["llama"]),
                                      "data.train": [str(files["messages"])],
                                      "data.seq_len": 512}, environ={})
    assert given.recipe.data.seq_len == 512  # what the user asks for is kept (and checked later)
