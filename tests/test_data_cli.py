"""`largeforge data validate|prepare|split|stats` through the real entry point."""

from __future__ import annotations

import json

from conftest import run_cli


def test_validate_exit_codes(shared_data, tmp_path):
    assert run_cli("data", "validate", str(shared_data / "alpaca_sample.json")).returncode == 0
    proc = run_cli("data", "validate", str(shared_data / "hh_rlhf_sample.jsonl"))
    assert proc.returncode == 1 and "empty" in proc.stdout
    proc = run_cli("data", "validate", str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_prepare_cleans_dedups_and_splits(shared_data, tmp_path):
    records = json.loads((shared_data / "alpaca_sample.json").read_text(encoding="utf-8"))[:300]
    noisy = [*records, records[0], {**records[1], "output": records[1]["output"] + "\x00"},
             {"instruction": "%%%% 1234", "input": "", "output": "#### 5678"}]
    source = tmp_path / "noisy.json"
    source.write_text(json.dumps(noisy), encoding="utf-8")
    before = source.read_bytes()
    out = tmp_path / "prepared"
    proc = run_cli("data", "prepare", str(source), "--output", str(out), "--eval-percent", "10")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "alpaca" and report["records_in"] == 303
    assert report["exact_duplicates"] >= 2 and report["quality"]["low_alpha_ratio"] == 1
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    evaluation = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert len(train) == report["train"] and len(evaluation) == report["eval"] > 0
    assert all("messages" in r for r in train)
    assert "\x00" not in (out / "train.jsonl").read_text() + (out / "eval.jsonl").read_text()
    assert source.read_bytes() == before
    again = run_cli("data", "prepare", str(source), "--output", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_split_and_stats(shared_data, tmp_path):
    data = str(shared_data / "chat_sample.jsonl")
    proc = run_cli("data", "split", data, "--output", str(tmp_path / "split"),
                   "--eval-percent", "20")
    assert proc.returncode == 0, proc.stderr
    n_train = len((tmp_path / "split" / "train.jsonl").read_text().splitlines())
    n_eval = len((tmp_path / "split" / "eval.jsonl").read_text().splitlines())
    assert n_eval > 0 and n_train > 3 * n_eval
    html = tmp_path / "stats.html"
    proc = run_cli("data", "stats", data, "--output", str(html))
    assert proc.returncode == 0, proc.stderr
    assert "turns per conversation" in proc.stdout and "<svg" in html.read_text()
