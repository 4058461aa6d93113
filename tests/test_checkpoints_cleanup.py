"""`largeforge checkpoints cleanup RUN --keep-best N --keep-last M [--dry-run]`: the right
checkpoints stay, best/ and final/ are never touched, the freed size printed is the bytes
removed, and the run still resumes exactly from what is left."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from conftest import logged_losses, run_cli
from largeforge.config import load_recipe
from largeforge.errors import LargeForgeError
from largeforge.runs import Registry, cleanup_checkpoints, plan_cleanup
from test_registry import error_line, recipe_dict, write_corpus


def du(path: Path) -> int:
    """Bytes of the files under `path`, counted independently of the code under test."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def fingerprint(*dirs: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


def step_dirs(run: Path) -> set[int]:
    return {int(p.name[5:]) for p in (run / "checkpoints").iterdir()
            if re.fullmatch(r"step-\d+", p.name)}


def listing(directory: Path) -> dict[str, int]:
    return {p.name: du(p) if p.is_dir() else p.stat().st_size for p in directory.iterdir()}


def quiet() -> Console:
    return Console(file=io.StringIO())


@pytest.fixture
def registry_path(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "registry.db"
    monkeypatch.setenv("LARGEFORGE_REGISTRY", str(path))
    return path


def test_cleanup_keeps_best_last_and_latest_and_the_run_still_resumes(
        shared_data, tmp_path, registry_path):
    from largeforge.training.loop import train

    recipe = load_recipe(recipe_dict(write_corpus(tmp_path), tmp_path / "runs", "ck",
                                     max_steps=16, save_every=2, eval_every=4,
                                     keep_checkpoints=50), environ={})
    train(recipe, console=quiet())
    run = tmp_path / "runs" / "ck"
    ckpts = run / "checkpoints"
    assert step_dirs(run) == {2, 4, 6, 8, 10, 12, 14, 16}
    losses_before = logged_losses(run)
    # What a crash in the middle of an earlier cleanup leaves: removed by this one.
    shutil.copytree(ckpts / "step-2", ckpts / ".step-2.deleting-999")
    val = {r["step"]: r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").open())
           if "val_loss" in r}
    assert sorted(val) == [4, 8, 12, 16]
    kept = set(sorted(val, key=lambda s: (val[s], s))[:2]) | {14, 16}  # best 2, last 2, latest
    removed = {2, 4, 6, 8, 10, 12, 14, 16} - kept
    sizes = {name: du(ckpts / name) for name in os.listdir(ckpts) if (ckpts / name).is_dir()}
    to_free = sum(sizes[f"step-{s}"] for s in removed) + sizes[".step-2.deleting-999"]
    untouched = fingerprint(run / "best", run / "final")
    before = listing(ckpts)

    dry = run_cli("checkpoints", "cleanup", "ck", "--keep-best", "2", "--keep-last", "2",
                  "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert listing(ckpts) == before, "--dry-run removed something"
    would = re.findall(r"would remove (\S+) \(.*?, ([\d,]+) bytes\)", dry.stdout)
    assert {Path(p).name: int(n.replace(",", "")) for p, n in would} == {
        **{f"step-{s}": sizes[f"step-{s}"] for s in removed},
        ".step-2.deleting-999": sizes[".step-2.deleting-999"]}
    assert f"bytes) in {len(removed) + 1} checkpoint(s)" in dry.stdout
    assert re.search(rf"dry run: would free .*\({to_free:,} bytes\)", dry.stdout)

    done = run_cli("checkpoints", "cleanup", str(run), "--keep-best", "2", "--keep-last", "2")
    assert done.returncode == 0, done.stderr
    assert step_dirs(run) == kept
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")], "a leftover stayed"
    gone = re.findall(r"removed (\S+) \(.*?, ([\d,]+) bytes\)", done.stdout)
    assert {Path(p).name for p, _ in gone} == {f"step-{s}" for s in removed} | {
        ".step-2.deleting-999"}
    assert sum(int(n.replace(",", "")) for _, n in gone) == to_free
    assert re.search(rf"^freed .*\({to_free:,} bytes\) in {len(removed) + 1} checkpoint",
                     done.stdout, re.M)
    assert sum(before.values()) - sum(listing(ckpts).values()) == to_free
    for step in kept:
        assert f"kept step-{step}" in done.stdout
    assert "latest (resume)" in done.stdout and (ckpts / "latest").read_text() == "step-16\n"
    assert fingerprint(run / "best", run / "final") == untouched

    # What is left resumes exactly: from the oldest kept checkpoint to the end, the same losses.
    created = Registry().get_run("ck").created
    oldest = min(kept)
    train(recipe, resume=str(ckpts / f"step-{oldest}"), console=quiet())
    assert logged_losses(run) == losses_before
    record = Registry().get_run("ck")  # a resume updates the run's row
    assert (record.status, record.step, record.created) == ("completed", 16, created)

    # Keeping nothing but what resume needs: only the checkpoint `latest` names stays.
    untouched = fingerprint(run / "best", run / "final")
    bare = run_cli("checkpoints", "cleanup", "ck", "--keep-best", "0", "--keep-last", "0")
    assert bare.returncode == 0, bare.stderr
    assert step_dirs(run) == {16}
    assert fingerprint(run / "best", run / "final") == untouched
    assert {"best", "final", "recipe.yaml", "metrics.jsonl", "run.json"} <= set(os.listdir(run))


def make_run(root: Path, steps: list[int], latest: int, val: dict[int, float]) -> Path:
    """A run directory's files, written out by hand: checkpoints of different sizes."""
    root.mkdir(parents=True)
    (root / "recipe.yaml").write_text("{}\n")
    for step in steps:
        directory = root / "checkpoints" / f"step-{step}"
        directory.mkdir(parents=True)
        (directory / "model.safetensors").write_bytes(b"w" * (1000 + step))
        (directory / "training_state.pt").write_bytes(b"s" * step)
    (root / "checkpoints" / "latest").write_text(f"step-{latest}\n")
    records = [{"step": s, "loss": 1.0} for s in steps]
    records += [{"step": s, "val_loss": v, "val_ppl": 1.0} for s, v in val.items()]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records)
                                        + '{"step": 99, "val_l')  # a torn last line
    for name in ("best", "final"):
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(b"m" * 10)
    return root


def test_latest_is_kept_even_when_neither_best_nor_last(tmp_path):
    # Resumed from step-3 (an early checkpoint), so `latest` names it.
    run = make_run(tmp_path / "run", [1, 2, 3, 4, 5, 6], latest=3,
                   val={2: 2.0, 3: 3.0, 4: 1.5, 6: 2.5})
    plan = plan_cleanup(run, keep_best=2, keep_last=1)
    assert {p.name: why for p, why in plan.keep.items()} == {
        "step-3": ["latest (resume)"], "step-4": ["best val_loss 1.5000"],
        "step-2": ["best val_loss 2.0000"], "step-6": ["last"]}
    assert [c.step for c in plan.remove] == [1, 5]
    assert plan.bytes_to_free == du(run / "checkpoints" / "step-1") + du(
        run / "checkpoints" / "step-5")
    result = cleanup_checkpoints(run, keep_best=2, keep_last=1)
    assert result.freed == 1001 + 1 + 1005 + 5
    assert step_dirs(run) == {2, 3, 4, 6}
    # Nothing asked to be kept: only `latest`; checkpoints without an evaluation are never best.
    cleanup_checkpoints(run, keep_best=10, keep_last=0)
    assert step_dirs(run) == {2, 3, 4, 6}
    cleanup_checkpoints(run, keep_best=0, keep_last=0)
    assert step_dirs(run) == {3}
    assert (run / "best" / "model.safetensors").is_file()
    assert (run / "final" / "model.safetensors").is_file()


def test_cleanup_errors_exit_2_and_remove_nothing(tmp_path, registry_path):
    run = make_run(tmp_path / "run", [1, 2, 3], latest=3, val={1: 1.0})
    before = fingerprint(run)
    for flag in ("--keep-best", "--keep-last"):
        line = error_line(run_cli("checkpoints", "cleanup", str(run), flag, "-1"))
        assert f"{flag} must be 0 or more, not -1" in line
    with pytest.raises(LargeForgeError, match="--keep-last must be 0 or more"):
        plan_cleanup(run, 1, -3)

    not_a_run = tmp_path / "plain"
    (not_a_run / "checkpoints" / "step-1").mkdir(parents=True)
    (not_a_run / "checkpoints" / "step-1" / "w.bin").write_bytes(b"x")
    assert "not a run directory" in error_line(
        run_cli("checkpoints", "cleanup", str(not_a_run), "--keep-last", "0"))
    assert (not_a_run / "checkpoints" / "step-1" / "w.bin").is_file()
    assert "not a run directory" in error_line(
        run_cli("checkpoints", "cleanup", str(run / "recipe.yaml")))

    assert "unknown run 'nowhere'" in error_line(run_cli("checkpoints", "cleanup", "nowhere"))
    assert not registry_path.exists(), "a name lookup must not create the registry"
    as_dir = tmp_path / "registry-dir"
    as_dir.mkdir()
    assert "is a directory" in error_line(
        run_cli("checkpoints", "cleanup", "run", "--registry", str(as_dir)))
    assert "is a directory" in error_line(
        run_cli("checkpoints", "cleanup", "run", env={"LARGEFORGE_REGISTRY": str(as_dir)}))
    assert list(as_dir.iterdir()) == []
    assert fingerprint(run) == before

    # Not an error: a run without checkpoints frees nothing.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "recipe.yaml").write_text("{}\n")
    out = run_cli("checkpoints", "cleanup", str(empty))
    assert out.returncode == 0 and "freed 0 B (0 bytes) in 0 checkpoint(s)" in out.stdout
