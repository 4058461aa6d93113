"""Training on several processes (torch.distributed, gloo on this CPU, 2 processes): DDP equals one
process with the same global batches, FSDP2 trains, checkpoints shards and consolidates to the
same model, a killed rank fails the job fast and the run resumes exactly, LoRA and DPO train
under DDP, and every bad input is one clear error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import SHARED_DATA, checkpoint_reached, run_cli
from largeforge.cli.main import main
from sft_tasks import CHAT_SPECIALS, split_task, task_texts
from tiny_models import make_family_model, make_tokenizer

STEPS = 24
TOL = 1e-5


def write_recipe(path: Path, data: Path, out: Path, name: str, **train: object) -> Path:
    recipe = {
        "model": {"preset": "tiny", "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                  "hidden_dim": 128, "max_seq_len": 32},
        "tokenizer": {"vocab_size": 300},
        "data": {"train": [str(data)], "seq_len": 32, "split": "tail"},
        "train": {"batch_size": 4, "max_steps": STEPS, "lr": 3e-3, "warmup_steps": 2,
                  "eval_every": 8, "eval_batches": 3, "log_every": 1, "save_every": 4,
                  "keep_checkpoints": 10, "precision": "fp32", "threads": 1, **train},
        "output": {"dir": str(out), "name": name},
    }
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def records(run_dir: Path) -> list[tuple[int, str, float]]:
    """(step, key, value) of every loss and val loss in metrics.jsonl."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        out += [(record["step"], k, record[k]) for k in ("loss", "val_loss") if k in record]
    return out


def assert_same_records(a: Path, b: Path, tol: float = TOL) -> None:
    ra, rb = records(a), records(b)
    assert [(s, k) for s, k, _ in ra] == [(s, k) for s, k, _ in rb]
    worst = max(abs(x - y) for (_, _, x), (_, _, y) in zip(ra, rb, strict=True))
    assert worst <= tol, f"{a.name} vs {b.name}: largest difference {worst}"


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """Runs in this process set train.threads=1; later tests get their threads back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_main(*args: str) -> int:
    """The CLI in this process (fast, for runs of one process and for errors)."""
    return main(list(args))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A 2-process DDP run (the reference) and the paths every test shares."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    root = tmp_path_factory.mktemp("dist")
    corpus = root / "corpus.txt"
    corpus.write_text((SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:60_000],
                      encoding="utf-8")
    out = root / "runs"
    recipe = write_recipe(root / "r.yaml", corpus, out, "ddp")
    proc = run_cli("train", "--config", str(recipe), "--nproc", "2")
    assert proc.returncode == 0, proc.stderr
    assert "global batch 4 per process x 1 accumulation x 2 processes = 8 sequences" in " ".join(
        proc.stdout.split())
    assert proc.stdout.count("done:") == 1  # rank 0 alone reports
    return {"root": root, "corpus": corpus, "out": out, "recipe": recipe}


def test_ddp_on_2_processes_equals_1_process_with_accumulation_2(world):
    out = world["out"]
    assert run_main("train", "--config", str(world["recipe"]), "--name", "single",
                    "--set", "train.grad_accum=2", "--set", "train.distributed=none") == 0
    ddp, single = out / "ddp", out / "single"
    assert_same_records(ddp, single)  # every train loss and every (sharded) val loss
    assert max_weight_diff(ddp / "final", single / "final") <= TOL
    # Checkpoints: the usual HF directory from rank 0 plus every rank's RNG states.
    step = ddp / "checkpoints" / f"step-{STEPS}"
    assert {"config.json", "model.safetensors", "training_state.pt", "rng-rank0.pt",
            "rng-rank1.pt", "distributed.json"} <= {p.name for p in step.iterdir()}
    assert json.loads((step / "distributed.json").read_text()) == {"mode": "ddp",
                                                                   "world_size": 2}
    hardware = json.loads((ddp / "run.json").read_text())["hardware"]
    assert hardware["distributed"] == "ddp" and hardware["processes"] == 2
    assert (ddp / "report.html").is_file()


@pytest.mark.slow  # ~25 s of torchrun; `make test` runs the slow tests after the rest
def test_fsdp_trains_checkpoints_shards_and_consolidates_to_the_unsharded_model(world, capsys):
    out, recipe = world["out"], world["recipe"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(  # torchrun itself, as users run it
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "largeforge", "train", "--config", str(recipe), "--name", "fsdp",
         "--set", "train.distributed=fsdp"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    fsdp = out / "fsdp"
    assert_same_records(out / "ddp", fsdp)
    step = fsdp / "checkpoints" / f"step-{STEPS}"
    names = {p.name for p in step.iterdir()}
    assert {"sharded", "model_config", "training_state.pt", "rng-rank0.pt", "rng-rank1.pt",
            "tokenizer.json"} <= names
    assert "model.safetensors" not in names and "config.json" not in names
    assert {p.name for p in (step / "sharded").iterdir()} >= {".metadata", "__0_0.distcp",
                                                               "__1_0.distcp"}
    # best/ and final/ are gathered into HF directories; final equals the unsharded run's.
    assert max_weight_diff(out / "ddp" / "final", fsdp / "final") <= TOL
    assert (fsdp / "best" / "model.safetensors").is_file()

    proc = run_cli("checkpoints", "consolidate", str(fsdp), "--checkpoint", f"step-{STEPS}")
    assert proc.returncode == 0, proc.stderr
    consolidated = fsdp / "consolidated" / f"step-{STEPS}"
    assert max_weight_diff(out / "ddp" / "final", consolidated) <= TOL
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(consolidated)
    assert AutoTokenizer.from_pretrained(consolidated).eos_token_id is not None
    ids = torch.randint(0, 300, (1, 8))
    final = AutoModelForCausalLM.from_pretrained(out / "ddp" / "final")
    with torch.no_grad():
        assert (model(ids).logits - final(ids).logits).abs().max() < 1e-4
    capsys.readouterr()
    assert run_main("checkpoints", "consolidate", str(fsdp), "--checkpoint", "latest") == 2
    assert "already exists" in capsys.readouterr().err

    # Resume on another number of processes: the shards of 2 ranks, resharded onto 1 process
    # with accumulation 2 (the same global batch), continue exactly as the 2-process run did.
    moved = out / "fsdp-on-1"
    shutil.copytree(fsdp, moved)
    assert run_main("train", "--config", str(recipe), "--name", "fsdp-on-1",
                    "--set", "train.distributed=fsdp", "--set", "train.grad_accum=2",
                    "--resume", str(moved / "checkpoints" / "step-12")) == 0
    assert_same_records(fsdp, moved)
    assert max_weight_diff(fsdp / "final", moved / "final") <= TOL
    assert json.loads((moved / "checkpoints" / f"step-{STEPS}" / "distributed.json")
                      .read_text())["world_size"] == 1


def _worker_of_rank(launcher: int, rank: int) -> int | None:
    """The pid of the child of `launcher` (torchrun's worker) whose RANK is `rank`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != launcher:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.slow  # ~25 s of torchrun; `make test` runs the slow tests after the rest
def test_a_killed_rank_fails_the_job_fast_and_resume_continues_exactly(world):
    out, recipe = world["out"], world["recipe"]
    killed = out / "killed"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "largeforge.cli.main", "train", "--config", str(recipe),
         "--name", "killed", "--nproc", "2", "--set", "train.dist_timeout=20"],
        env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        reached = checkpoint_reached(killed, 8)
        deadline = time.time() + 300
        while not reached() and time.time() < deadline:
            assert launcher.poll() is None, launcher.stderr.read() if launcher.stderr else ""
            time.sleep(0.01)
        rank1 = _worker_of_rank(launcher.pid, 1)
        assert rank1 is not None
        os.kill(rank1, signal.SIGKILL)
        killed_at = time.time()
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    # Well before the 20 s collective timeout: torchrun saw the dead rank and stopped the other.
    assert time.time() - killed_at < 15
    assert launcher.returncode == 2
    assert "rank 1 was killed by SIGKILL" in stderr and "--resume" in stderr
    # The surviving rank, when it noticed first, says so in one line too.
    assert "Traceback" not in stderr
    assert not (killed / "final").exists(), "the run finished before it was killed"

    proc = run_cli("train", "--config", str(recipe), "--name", "killed", "--nproc", "2",
                   "--resume", "--set", "train.dist_timeout=20")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout
    assert records(killed) == records(out / "ddp")  # bit for bit
    assert max_weight_diff(out / "ddp" / "final", killed / "final") == 0.0


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(task_texts(), *CHAT_SPECIALS)


def _base(tokenizer, directory: Path) -> Path:
    make_family_model("llama", tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.slow  # ~25 s of torchrun; `make test` runs the slow tests after the rest
def test_lora_under_ddp_reduces_only_adapters_and_equals_1_process(tokenizer, tmp_path):
    base = _base(tokenizer, tmp_path / "base")
    data = tmp_path / "train.jsonl"
    train, _ = split_task(120, 0)
    data.write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
    args = ["train", "sft", "--model", str(base), "--dataset", str(data), "--method", "lora",
            "--chat-template", "chatml", "--seq-len", "64", "--precision", "fp32",
            "--max-steps", "6", "--batch-size", "4", "--lr", "1e-2", "--eval-every", "3",
            "--set", "lora.dropout=0", "--set", "train.log_every=1",
            "--set", "train.threads=1"]
    proc = run_cli(*args, "--output", str(tmp_path / "ddp"), "--nproc", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("adapter (PEFT format)") == 1
    assert run_main(*args, "--output", str(tmp_path / "one"), "--grad-accum", "2",
                    "--set", "train.distributed=none") == 0
    assert_same_records(tmp_path / "ddp", tmp_path / "one")
    final = tmp_path / "ddp" / "final"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in
                                                                     final.iterdir()}
    a = load_file(final / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    assert all("lora_" in k for k in a)
    # The one-process run takes the fused output layer + loss (objectives.fused_head), DDP the
    # model's own forward (its hooks live there): the same sums in another order. The losses
    # above agree within TOL; six Adam steps at lr 1e-2 amplify the rounding in the adapter
    # weights to about 1.3e-5 (measured), so they are held to 5e-5.
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 5 * TOL


@pytest.mark.slow  # ~25 s of torchrun; `make test` runs the slow tests after the rest
def test_dpo_under_ddp_equals_1_process(tokenizer, tmp_path):
    base = _base(tokenizer, tmp_path / "base")
    train, _ = split_task(80, 0, seed=3)
    pairs = [{"prompt": r["messages"][0]["content"], "chosen": r["messages"][1]["content"],
              "rejected": r["messages"][0]["content"]} for r in train]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    # Full DPO: the reference is a frozen copy, run without gradients beside the DDP policy.
    args = ["train", "dpo", "--model", str(base), "--dataset", str(data), "--method", "full",
            "--chat-template", "chatml", "--seq-len", "64", "--precision", "fp32",
            "--max-steps", "4", "--batch-size", "4", "--lr", "1e-3",
            "--set", "train.log_every=1", "--set", "train.eval_every=2",
            "--set", "train.threads=1"]
    proc = run_cli(*args, "--output", str(tmp_path / "ddp"), "--nproc", "2")
    assert proc.returncode == 0, proc.stderr
    assert run_main(*args, "--output", str(tmp_path / "one"), "--grad-accum", "2",
                    "--set", "train.distributed=none") == 0
    assert_same_records(tmp_path / "ddp", tmp_path / "one")
    logged = [json.loads(line) for line in
              (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    margins = [r["reward_margin"] for r in logged if "reward_margin" in r]
    ones = [json.loads(line)["reward_margin"] for line in
            (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
            if "reward_margin" in line]
    assert margins == pytest.approx(ones, abs=TOL) and len(margins) == 4


# --- Errors: one line, exit code 2, nothing written ----------------------------------------


def test_bad_distributed_inputs_are_clear_errors(world, tokenizer, tmp_path, capsys,
                                                 monkeypatch):
    recipe, out = world["recipe"], world["out"]
    before = sorted(p.name for p in out.iterdir())

    def error(*args: str) -> str:
        capsys.readouterr()
        assert run_main(*args) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.startswith("error:")
        return " ".join(err.split())

    assert "train.distributed" in error("train", "--config", str(recipe), "--name", "x",
                                        "--set", "train.distributed=zero")
    assert "--nproc must be 1 or more, not 0" in error("train", "--config", str(recipe),
                                                       "--name", "x", "--nproc", "0")
    assert "put --nproc after `sft`" in error("train", "--nproc", "2", "sft")
    # LoRA keeps a frozen base that FSDP would not shard.
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(r) + "\n" for r in split_task(8, 0)[0]))
    assert "use train.distributed=ddp" in error(
        "train", "sft", "--model", str(tmp_path), "--dataset", str(chats),
        "--output", str(tmp_path / "lora"), "--set", "train.distributed=fsdp")
    assert not (tmp_path / "lora").exists()
    # Another global batch on another number of processes is named, not resumed.
    message = error("train", "--config", str(recipe), "--name", "ddp", "--resume",
                    "--set", "train.grad_accum=3", "--set", "train.distributed=auto")
    assert "train.grad_accum: 1 in the checkpoint, 3 now" in message
    assert "global batch = batch_size x grad_accum x processes: 8 then on 2, 12 now on 1" in (
        message)
    # A DDP checkpoint resumed under FSDP (or the reverse) is refused by name.
    assert "train.distributed: 'auto' in the checkpoint, 'fsdp' now" in error(
        "train", "--config", str(recipe), "--name", "ddp", "--resume",
        "--set", "train.distributed=fsdp", "--set", "train.grad_accum=2")

    # Under torchrun (its environment), a recipe that says none is told what to set.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert "train.distributed is none: set it to ddp or fsdp" in error(
        "train", "--config", str(recipe), "--name", "x", "--set", "train.distributed=none")
    assert "--nproc starts torchrun itself" in error("train", "--config", str(recipe),
                                                     "--name", "x", "--nproc", "2")
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == before


def test_consolidate_errors(world, capsys, tmp_path):
    ddp = world["out"] / "ddp"

    def error(*args: str) -> str:
        capsys.readouterr()
        assert run_main(*args) == 2
        return " ".join(capsys.readouterr().err.split())

    assert "already a Hugging Face model directory" in error("checkpoints", "consolidate",
                                                             str(ddp))
    assert "no such checkpoint" in error("checkpoints", "consolidate", str(ddp),
                                         "--checkpoint", "step-999")
    assert "is not a run directory" in error("checkpoints", "consolidate", str(tmp_path))
    assert not (ddp / "consolidated").exists()
