"""Writing what `data prepare` and `data split` produce: `train.jsonl`, `eval.jsonl` and
`report.json` in one directory, written to a temporary directory and renamed, so a failure
leaves nothing half-written and an existing output is never replaced without `overwrite`."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from largeforge.data.cleaning import in_eval_split, record_text
from largeforge.errors import LargeForgeError

Record = dict[str, Any]


def split_records(
    records: Iterable[Record], eval_percent: float = 10.0
) -> tuple[list[Record], list[Record]]:
    """(train, eval) by a stable hash of each record's text: adding records never moves old
    ones between the two."""
    if not 0 <= eval_percent < 100:
        raise LargeForgeError(f"--eval-percent must be in [0, 100), not {eval_percent}")
    train: list[Record] = []
    evaluation: list[Record] = []
    for record in records:
        (evaluation if in_eval_split(record_text(record), eval_percent) else train).append(record)
    return train, evaluation


def write_prepared(
    output: str | Path,
    train: list[Record],
    evaluation: list[Record],
    report: dict[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Write the splits and the report to `output` atomically; returns the directory."""
    target = Path(output)
    if target.exists() and not target.is_dir():
        raise LargeForgeError(f"output {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise LargeForgeError(f"output {target} is not empty; choose another or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name, records in (("train.jsonl", train), ("eval.jsonl", evaluation)):
            with (staging / name).open("w", encoding="utf-8") as handle:
                for record in records:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        (staging / "report.json").write_text(
            json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
