"""`largeforge doctor` reports versions, the device and a measured bf16 verdict."""

from __future__ import annotations

import json

import torch

from conftest import run_cli
from largeforge.hardware import bf16_speed_ratio, resolve_precision


def test_doctor_prints_the_machine_and_exits_0():
    proc = run_cli("doctor")
    assert proc.returncode == 0, proc.stderr
    for word in ("python", "torch", "transformers", "device", "bf16", "memory", "extra: serve"):
        assert word in proc.stdout


def test_doctor_json_is_complete():
    proc = run_cli("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["torch"] == torch.__version__
    assert report["device"] in ("cpu", "cuda", "mps")
    assert report["cpu_cores"] >= 1 and report["torch_threads"] >= 1
    assert isinstance(report["bf16_speed_vs_fp32"], float)
    assert report["precision"] in ("fp32", "bf16")
    assert set(report["extras"]) >= {"serve", "export", "eval"}


def test_precision_follows_the_measured_probe():
    ratio = bf16_speed_ratio("cpu")
    expected = "bf16" if ratio >= 1.0 else "fp32"
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
