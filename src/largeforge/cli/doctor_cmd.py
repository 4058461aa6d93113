"""`largeforge doctor`: what this machine offers for training."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table


def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    device: str = typer.Option("auto", help="Device to inspect: auto, cpu, cuda, mps."),
) -> None:
    """Show Python, torch and device facts, and whether bf16 is fast here (measured)."""
    from largeforge.hardware import hardware_report

    report = hardware_report(device)
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
        return
    table = Table(title="largeforge doctor", show_header=False)
    table.add_row("python", report.python)
    table.add_row("torch", report.torch)
    table.add_row("transformers", report.transformers or "not installed")
    table.add_row("device", f"{report.device} ({report.device_name})")
    table.add_row("cpu cores / torch threads", f"{report.cpu_cores} / {report.torch_threads}")
    table.add_row("memory", f"{report.memory_gib} GiB" if report.memory_gib else "unknown")
    verdict = "fast" if report.bf16_fast else "slow"
    table.add_row(
        "bf16 matmul", f"{verdict}: {report.bf16_speed_vs_fp32:.4g}x fp32 speed (timed probe)"
    )
    table.add_row("training precision (auto)", report.precision)
    for extra, packages in report.extras.items():
        have = [f"{p} {v}" for p, v in packages.items() if v]
        missing = [p for p, v in packages.items() if not v]
        text = ", ".join(have) or "-"
        if missing:
            text += f"  (missing: {', '.join(missing)})"
        table.add_row(f"extra: {extra}", text)
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
