"""The run report (report.html) of a real tiny training run, read by headless Chromium: every
image renders, the tables hold the expected rows, nothing is fetched from the network; plus the
edge cases (no eval records, a single step, an objective's own metrics, a damaged log) and the
errors."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from browser import open_in_chromium, table_cells_probe
from conftest import SHARED_DATA
from largeforge.errors import LargeForgeError
from largeforge.runs.report import write_run_report

DATA_URI = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]*)"')


def tiny_run_recipe(corpus: Path, out: Path, name: str, **train: object) -> dict:
    """A 0.09M-parameter Llama pretrained for a handful of steps (as in test_train.py), with
    room in its context for an Alpaca prompt and an answer (test_compare.py)."""
    return {
        "model": {"preset": "tiny", "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                  "hidden_dim": 128, "max_seq_len": 256},
        "tokenizer": {"vocab_size": 300},
        "data": {"train": [str(corpus)], "seq_len": 32, "split": "tail"},
        "train": {"batch_size": 8, "max_steps": 9, "lr": 3e-3, "warmup_steps": 2,
                  "eval_every": 3, "eval_batches": 2, "log_every": 1, **train},
        "output": {"dir": str(out), "name": name},
    }


_RUNS: dict[str, Path] = {}


def tiny_run(factory: pytest.TempPathFactory, name: str, lr: float) -> Path:
    """A real run made by the tool (9 steps, eval every 3), trained once per test session and
    shared with test_compare.py, which compares two of them."""
    from largeforge.config import load_recipe
    from largeforge.training.loop import train

    if name not in _RUNS:
        if not SHARED_DATA.is_dir():
            pytest.skip(f"shared data not found at {SHARED_DATA}")
        root = factory.getbasetemp() / "report-runs"
        corpus = root / "shakespeare.txt"
        if not corpus.is_file():
            root.mkdir(exist_ok=True)
            text = (SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
            corpus.write_text(text[:60_000], encoding="utf-8")
        recipe = tiny_run_recipe(corpus, root / "runs", name, lr=lr)
        _RUNS[name] = train(load_recipe(recipe, environ={})).run_dir
    return _RUNS[name]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory, "fast", lr=1e-2)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in
            (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def copy_run(run_dir: Path, dest: Path) -> Path:
    """A copy to change by hand: the real run's files with no weights (the report reads only
    the logs, run.json, the recipe and the directory listing)."""
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.pt"))
    (dest / "report.html").unlink(missing_ok=True)
    return dest


def images(html: str) -> dict[str, Image.Image]:
    """alt text -> the decoded PNG of every embedded image."""
    return {alt: Image.open(io.BytesIO(base64.b64decode(data)))
            for data, alt in DATA_URI.findall(html)}


def test_training_writes_the_report_and_runs_report_writes_it_again(
    real_run: Path, tmp_path: Path
) -> None:
    from conftest import run_cli

    written_by_training = (real_run / "report.html").read_text(encoding="utf-8")
    assert f"LargeForge run {real_run.name}" in written_by_training
    assert 'alt="Loss"' in written_by_training

    out = tmp_path / "again.html"
    result = run_cli("runs", "report", str(real_run), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    assert 'alt="Loss"' in out.read_text(encoding="utf-8")

    missing = run_cli("runs", "report", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "error:" in missing.stderr


def test_report_of_a_real_run_renders_offline_in_chromium(real_run: Path) -> None:
    start = time.perf_counter()
    path = write_run_report(real_run)
    seconds = time.perf_counter() - start
    print(f"write_run_report: {seconds:.2f} s")
    assert path == real_run / "report.html"
    html = path.read_text(encoding="utf-8")
    state = json.loads((real_run / "run.json").read_text())
    evals = [r for r in records(real_run) if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6, 9]

    pngs = images(html)
    assert {"Loss", "Learning rate", "Throughput", "MFU", "Gradient norm"} <= set(pngs)
    assert all(img.format == "PNG" and img.width > 300 for img in pngs.values())
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert f"val loss {state['best_val_loss']:.4f}" in html
    assert state["hardware"]["device_name"] in html

    checkpoints = sorted((p.name for p in (real_run / "checkpoints").iterdir() if p.is_dir()),
                         key=lambda name: int(name.split("-")[1]))
    page = open_in_chromium(path, "run-report", probes={
        "eval": table_cells_probe("eval"), "checkpoints": table_cells_probe("checkpoints"),
        "recipe": "() => document.querySelector('pre#recipe').innerText",
    })
    assert page.title == f"LargeForge run {real_run.name}"
    assert len(page.images) == len(pngs) and not page.broken_images, page.images
    assert page.external_requests == [] and page.console_errors == []
    assert page.tables == {
        "summary": 9, "eval": 3, "checkpoints": len(checkpoints) + 2,  # + best/ and final/
        "hardware": len(state["hardware"]),
    }
    assert all(height > 0 for height in page.table_heights.values())
    # The eval table: one row per eval record, the best one (and only it) bold and marked.
    rows = page.probes["eval"]
    assert [int(row[0]["text"]) for row in rows] == [3, 6, 9]
    assert [float(row[1]["text"]) for row in rows] == pytest.approx(
        [r["val_loss"] for r in evals], abs=1e-4)
    marked = [int(row[0]["text"]) for row in rows if row[0]["best"]]
    assert marked == [state["best_step"]]
    best_row = next(row for row in rows if row[0]["best"])
    assert best_row[-1]["text"] == "★ best" and best_row[1]["weight"] >= 700
    assert all(row[1]["weight"] < 700 for row in rows if not row[0]["best"])
    # Checkpoints, best/ and final/ as on disk; the recipe as written.
    names = [row[0]["text"] for row in page.probes["checkpoints"]]
    assert names == [f"checkpoints/{c}" for c in checkpoints] + ["best/", "final/"]
    recipe = (real_run / "recipe.yaml").read_text(encoding="utf-8")
    assert page.probes["recipe"].strip() == recipe.strip()
    assert page.screenshot is not None and page.screenshot.stat().st_size > 10_000
    assert "Hardware" in page.text and "Throughput (median)" in page.text


def test_a_single_step_without_eval_records_still_gives_a_valid_report(real_run, tmp_path):
    run = copy_run(real_run, tmp_path / "one-step")
    first = records(real_run)[0]
    (run / "metrics.jsonl").write_text(json.dumps(first) + "\n", encoding="utf-8")
    state = json.loads((run / "run.json").read_text())
    for key in ("best_val_loss", "best_step", "last_val_loss"):
        state.pop(key, None)
    state.update(step=first["step"], status="running")
    (run / "run.json").write_text(json.dumps(state), encoding="utf-8")
    shutil.rmtree(run / "best")

    html = write_run_report(run).read_text(encoding="utf-8")
    assert "No evaluation records" in html and 'id="eval"' not in html
    page = open_in_chromium(run / "report.html", "run-report-single-step")
    assert len(page.images) >= 4 and not page.broken_images
    assert "eval" not in page.tables and page.tables["summary"] == 9
    assert page.external_requests == []
    assert "– (no evaluation yet)" in page.text


def test_a_run_with_only_its_recipe_gives_a_report(real_run, tmp_path):
    run = tmp_path / "just-started"
    run.mkdir()
    shutil.copy(real_run / "recipe.yaml", run / "recipe.yaml")
    html = write_run_report(run, tmp_path / "elsewhere" / "r.html").read_text(encoding="utf-8")
    assert "No metrics logged yet" in html and "No checkpoints yet" in html
    assert "<img" not in html and not (run / "report.html").exists()


def test_objective_metrics_get_their_own_curves_and_eval_columns(real_run, tmp_path):
    """A DPO-like run logs rewards and preference accuracy next to the loss."""
    run = copy_run(real_run, tmp_path / "dpo-like")
    lines = []
    for i, record in enumerate(records(real_run)):
        if "loss" in record:
            record.update(rewards_chosen=0.1 * i, rewards_rejected=-0.1 * i,
                          preference_accuracy=min(1.0, 0.5 + 0.05 * i))
        else:
            record["val_preference_accuracy"] = 0.75
        lines.append(json.dumps(record))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    html = write_run_report(run).read_text(encoding="utf-8")
    pngs = images(html)
    assert {"rewards_chosen", "rewards_rejected", "preference_accuracy"} <= set(pngs)
    assert "<th>val preference accuracy</th>" in html and "0.7500" in html


def test_damaged_lines_are_counted_and_text_from_the_run_is_escaped(real_run, tmp_path):
    run = copy_run(real_run, tmp_path / "killed")
    with (run / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"step": 10, "loss": 4.1, "lr"')  # killed mid-write
    with (run / "recipe.yaml").open("a", encoding="utf-8") as f:
        f.write("# </pre><script>alert('x')</script> & <b>bold</b>\n")
    html = write_run_report(run).read_text(encoding="utf-8")
    assert "1 unreadable line(s) of metrics.jsonl" in html
    table = re.search(r'<table id="eval">.*?</table>', html, re.S)
    assert table is not None and table.group(0).count("<tr") == 1 + 3  # header + 3 evals
    assert "<script" not in html and "<b>bold" not in html
    assert "&lt;/pre&gt;&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &lt;b&gt;" in html


def test_errors_name_the_problem_and_write_nothing(real_run, tmp_path):
    with pytest.raises(LargeForgeError, match="not found"):
        write_run_report(tmp_path / "missing")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hi", encoding="utf-8")
    with pytest.raises(LargeForgeError, match=r"not a run directory \(it has no recipe.yaml\)"):
        write_run_report(plain)
    assert sorted(p.name for p in plain.iterdir()) == ["notes.txt"]

    run = copy_run(real_run, tmp_path / "run")
    with pytest.raises(LargeForgeError, match="is a directory"):
        write_run_report(run, tmp_path)
    with pytest.raises(LargeForgeError, match=r"must end in \.html"):
        write_run_report(run, tmp_path / "report.txt")
    (run / "run.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(LargeForgeError, match=r"run\.json is not valid JSON"):
        write_run_report(run)
    assert not (run / "report.html").exists() and not (tmp_path / "report.txt").exists()


def test_the_browser_check_catches_network_requests_and_broken_images(tmp_path):
    """The checks above can fail: a page reaching for the network and an image that does not
    decode are both reported."""
    page_file = tmp_path / "bad.html"
    page_file.write_text(
        '<!DOCTYPE html><html><head><title>bad</title></head><body>'
        '<img src="http://192.0.2.1/remote.png" alt="remote">'
        '<img src="data:image/png;base64,AAAA" alt="broken">'
        '<table id="t"><tbody><tr><td>1</td></tr></tbody></table></body></html>',
        encoding="utf-8")
    page = open_in_chromium(page_file, "browser-check-negative")
    assert page.external_requests == ["http://192.0.2.1/remote.png"]
    assert [i["alt"] for i in page.broken_images] == ["remote", "broken"]
    assert page.tables == {"t": 1}
