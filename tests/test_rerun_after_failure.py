"""A failed or killed start never blocks the next one (issue 18, class 6).

Every command checks all its inputs before it writes anything, so a refused command leaves
nothing behind; it writes through temporaries that are removed on failure, and the temporaries
of a process killed outright (SIGKILL: no clean-up runs) are swept by the next start. A run
killed before its first checkpoint holds nothing to resume: the plain command (or `--resume`)
starts it afresh and says so in one line. A run with checkpoints still needs `--resume` or
`--overwrite`.
"""

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

from cli_contract import refused, save_tiny_model, succeeds

TEXT = "Once upon a time there was a little fox who lived in the forest.\n" * 60
TRAIN = ["train", "--data", "small.txt", "--preset", "tiny", "--max-steps", "2",
         "--set", "tokenizer.vocab_size=300", "--set", "data.seq_len=16",
         "--set", "model.dim=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2",
         "--set", "model.n_kv_heads=1", "--set", "train.batch_size=2",
         "--output-dir", "runs", "--name", "run"]
# Long enough to be killed before its first checkpoint (at step 50000).
LONG = ["--max-steps", "100000", "--set", "train.eval_every=50000"]
AFRESH = "no checkpoint was saved in runs/run before its run stopped"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "small.txt").write_text(TEXT, encoding="utf-8")
    words = "fox river stone cloud forest meadow owl winter lantern harbor".split()
    (tmp_path / "story.txt").write_text("".join(
        f"The {words[i % 10]} and the {words[(i * 3 + 1) % 10]} met on day {i}.\n"
        for i in range(40)), encoding="utf-8")
    # Fine to the format check; its last record is found wrong only when it is tokenised.
    lines = [json.dumps({"text": f"Once upon a time there was a fox number {i}."})
             for i in range(50)]
    (tmp_path / "late.jsonl").write_text("\n".join([*lines, '{"text": 7}']) + "\n",
                                         encoding="utf-8")
    return tmp_path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))


def hidden(directory: Path) -> list[str]:
    """Leftovers: the entries of `directory` whose names start with a dot."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def killed_while(cwd: Path, code: str) -> None:
    """Run Python `code` in a new process in which `die()` SIGKILLs the process on the spot,
    as a power cut or the OOM killer would: no exception, no clean-up handler."""
    prelude = "import os, signal\ndef die(*args, **kwargs):\n    os.kill(os.getpid(), 9)\n"
    proc = subprocess.run([sys.executable, "-c", prelude + code], cwd=cwd, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


# -- train: refused late, nothing left ----------------------------------------------------------


def test_a_train_refused_by_a_late_check_leaves_nothing_and_the_fix_runs(workdir: Path) -> None:
    # Found when batching, once the tokenizer, the corpus and the model are built.
    line = refused(workdir, *TRAIN, "--set", "data.seq_len=1000",
                   "--set", "model.max_seq_len=1024")
    assert "too few for one window of data.seq_len 1000" in line
    # Found when the data are read for the tokenizer, file and line named.
    line = refused(workdir, *TRAIN, "--data", "late.jsonl")
    assert "late.jsonl:51" in line
    assert not (workdir / "runs").exists()
    # The corrected command needs no --overwrite.
    out = succeeds(workdir, *TRAIN)
    assert "no checkpoint was saved" not in out
    assert (workdir / "runs" / "run" / "final").is_dir()
    assert hidden(workdir / "runs") == [] and hidden(workdir / "runs" / "run") == []


# -- train: killed before its first checkpoint --------------------------------------------------


def start_and_wait_until_running(cwd: Path, *args: str) -> subprocess.Popen:
    """Start the CLI and return once its run is claimed and training (run.json written)."""
    proc = subprocess.Popen([sys.executable, "-m", "largeforge.cli.main", *args], cwd=cwd,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = cwd / "runs" / "run" / "run.json"
    deadline = time.time() + 300
    while not (state.is_file() and '"running"' in state.read_text(encoding="utf-8")):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.time() < deadline, "the run did not start"
        time.sleep(0.02)
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


def test_a_run_killed_before_its_first_checkpoint_starts_afresh(workdir: Path) -> None:
    run = workdir / "runs" / "run"
    live = start_and_wait_until_running(workdir, *TRAIN, *LONG)
    try:
        # While it trains, another start of the same run is refused, and changes nothing.
        line = refused(workdir, *TRAIN, watch=run / "tokenizer")
        assert "is in use: another process is training this run" in line
    finally:
        kill(live)
    assert (run / "recipe.yaml").is_file() and not (run / "checkpoints" / "latest").exists()
    shutil.copytree(run, workdir / "runs" / "again")  # a second run killed the same way
    # A refused start leaves the killed run as it is (the restart happens at the claim).
    refused(workdir, *TRAIN, "--set", "data.seq_len=1000", "--set", "model.max_seq_len=1024")

    out = succeeds(workdir, *TRAIN)  # the plain command: nothing to resume, so afresh
    assert AFRESH in out and "already holds a run" not in out
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-2"
    assert json.loads((run / "run.json").read_text())["status"] == "completed"

    out = succeeds(workdir, *TRAIN, "--name", "again", "--resume")  # the same, and says so
    assert AFRESH.replace("runs/run", "runs/again") in out and "resumed from" not in out
    again = workdir / "runs" / "again"
    assert json.loads((again / "run.json").read_text())["status"] == "completed"
    assert hidden(again) == [] and hidden(workdir / "runs") == []
    # A run with a checkpoint is kept (test_cli_errors): --resume or --overwrite, as before.


def test_resume_finds_a_checkpoint_that_latest_does_not_name_yet(tmp_path: Path) -> None:
    """Killed between renaming its first checkpoint into place and writing `latest`: the
    checkpoint is complete, and `--resume` takes it (rather than "nothing to resume")."""
    from largeforge.config import load_recipe
    from largeforge.errors import LargeForgeError
    from largeforge.runs import RunDir
    from largeforge.training.run_claim import claim_run_dir, find_checkpoint, never_saved

    run = RunDir(tmp_path / "run")
    recipe = load_recipe(None, environ={}).recipe
    (run.checkpoint(4)).mkdir(parents=True)
    run.recipe.write_text(recipe.to_yaml(), encoding="utf-8")
    (run.checkpoint(4) / "training_state.pt").write_bytes(b"")
    (run.checkpoint(4) / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    (run.checkpoints / ".step-6.tmp-abcd1234").mkdir()  # a write cut short
    assert not never_saved(run)
    assert find_checkpoint(None, run.path) == run.checkpoint(4)
    assert claim_run_dir(run.path, recipe, resume="latest", overwrite=False,
                         dry_run=True) == run.checkpoint(4)
    with pytest.raises(LargeForgeError, match="already holds a run"):
        claim_run_dir(run.path, recipe, resume=None, overwrite=False, dry_run=True)


def test_a_run_directory_holding_only_leftovers_is_free(tmp_path: Path) -> None:
    """The temporaries of killed writers count as nothing: the directory is claimed, and the
    leftovers swept."""
    from largeforge.config import load_recipe
    from largeforge.training.run_claim import claim_run_dir

    run_dir = tmp_path / "run"
    killed_while(tmp_path, "from pathlib import Path\nfrom largeforge.atomic_files import "
                 "temp_file\nPath('run').mkdir()\nwith temp_file(Path('run/recipe.yaml')):\n"
                 "    die()\n")
    assert len(hidden(run_dir)) == 1
    recipe = load_recipe(None, environ={}).recipe
    assert claim_run_dir(run_dir, recipe, resume=None, overwrite=False) is None
    assert sorted(p.name for p in run_dir.iterdir()) == ["recipe.yaml"]


# -- exports, tokenizer, data prepare: killed mid-write -----------------------------------------


def test_a_killed_gguf_export_leaves_no_temporary_behind(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    killed_while(tmp_path, "import gguf\nfrom largeforge.export.gguf import export_gguf\n"
                 "gguf.GGUFWriter.write_tensors_to_file = die\n"
                 f"export_gguf({str(model_dir)!r}, 'out/model.gguf', dtype='f16')\n")
    [leftover] = hidden(tmp_path / "out")  # what the issue saw: a .tmp file "forever"
    assert leftover.startswith(".model.gguf.tmp-")
    succeeds(tmp_path, "export", str(model_dir), "--format", "gguf", "--dtype", "f16",
             "--output", "out/model.gguf")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.gguf"]


def test_a_killed_hf_export_leaves_no_blocker(model_dir: Path, tmp_path: Path) -> None:
    killed_while(tmp_path, "import largeforge.export.hf as hf\nhf.save_tokenizer = die\n"
                 f"hf.export_hf({str(model_dir)!r}, 'hf')\n")
    assert not (tmp_path / "hf").exists() and len(hidden(tmp_path)) == 1
    succeeds(tmp_path, "export", str(model_dir), "--format", "hf", "--output", "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file() and hidden(tmp_path) == []


def test_a_killed_tokenizer_training_and_data_prepare_leave_no_blocker(workdir: Path) -> None:
    killed_while(workdir, "import transformers\nfrom largeforge.tokenizer import "
                 "train_tokenizer\ntransformers.PreTrainedTokenizerFast.save_pretrained = die\n"
                 "train_tokenizer(['some text to learn from'] * 50, 300, 'tok')\n")
    killed_while(workdir, "from largeforge.data.prepared import write_prepared\n"
                 "class Dying(list):\n    def __iter__(self):\n        yield from self[:1]\n"
                 "        die()\n"
                 "write_prepared('prepared', Dying([{'text': 'a'}, {'text': 'b'}]), [], {})\n")
    assert len(hidden(workdir)) == 2
    assert not (workdir / "tok").exists() and not (workdir / "prepared").exists()
    succeeds(workdir, "tokenizer", "train", "--data", "small.txt", "--vocab-size", "300",
             "--output", "tok")
    succeeds(workdir, "data", "prepare", "story.txt", "--output", "prepared")
    assert (workdir / "tok" / "tokenizer.json").is_file()
    assert (workdir / "prepared" / "train.jsonl").is_file() and hidden(workdir) == []
