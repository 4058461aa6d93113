"""`prepare_dataset` and `split_dataset` (`largeforge data prepare` and `data split`), and writing
what they produce: `train.jsonl`, `eval.jsonl` and `report.json` in one directory, written to a
temporary directory and renamed, so a failure leaves nothing half-written and an existing output
is never replaced without `overwrite`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from largeforge.atomic_files import replace_path, temp_dir
from largeforge.data.cleaning import PrepareReport, in_eval_split, record_text
from largeforge.errors import LargeForgeError
from largeforge.staging import check_parents

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
    check_prepared_output(target, overwrite=overwrite)
    with temp_dir(target) as staging:  # a killed earlier write's staging is swept first
        for name, records in (("train.jsonl", train), ("eval.jsonl", evaluation)):
            with (staging / name).open("w", encoding="utf-8") as handle:
                for record in records:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        (staging / "report.json").write_text(
            json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        replace_path(staging, target)
    return target


def check_prepared_output(target: Path, *, overwrite: bool) -> None:
    """Refuse an output that cannot be a prepared-data directory, or holds something (unless
    `overwrite`): checked first, before the inputs are read."""
    check_parents(target)
    if target.exists() and not target.is_dir():
        raise LargeForgeError(f"output {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise LargeForgeError(f"output {target} is not empty; choose another or pass --overwrite")


NORMAL_FORMS = ("NFC", "NFKC", "NFD", "NFKD")


def load_dataset_records(
    inputs: str | Path | Sequence[str | Path], format: str | None = None, *,
    text_field: str = "text",
) -> tuple[str, list[Record]]:
    """(format, records) of the input: files, directories, globs or saved datasets, read and
    normalised as every `largeforge data` command reads them (`formats.load_records`)."""
    from largeforge.data.formats import load_records

    loaded = load_records(_input_list(inputs), format, text_field=text_field)
    return loaded.format, [dict(record) for record in loaded.dataset]


@dataclass
class PreparedData:
    """What `prepare_dataset` or `split_dataset` wrote to `output`."""

    output: Path
    format: str
    train: list[Record]
    eval: list[Record]
    records_in: int
    report: PrepareReport | None = None  # prepare_dataset: what each cleaning step removed
    summary: dict[str, Any] = field(default_factory=dict)  # report.json as written


def prepare_dataset(
    inputs: str | Path | Sequence[str | Path],
    output: str | Path,
    *,
    format: str | None = None,
    text_field: str = "text",
    eval_percent: float = 10.0,
    near_dedup: float | None = 0.85,
    min_chars: int = 1,
    max_chars: int | None = None,
    min_alpha_ratio: float = 0.5,
    normal_form: str = "NFC",
    overwrite: bool = False,
) -> PreparedData:
    """Clean and split a dataset as `largeforge data prepare` does: Unicode normalisation
    (`normal_form`) and control characters stripped, exact and near duplicates removed (MinHash
    Jaccard >= `near_dedup`; 0 or None is off), quality filters (`min_chars`, `max_chars`,
    `min_alpha_ratio`), a stable train/eval split (`eval_percent`); writes train.jsonl,
    eval.jsonl and report.json to `output`."""
    from largeforge.data.cleaning import QualityRules, prepare_records

    if normal_form not in NORMAL_FORMS:
        raise LargeForgeError(f"--normal-form must be NFC, NFKC, NFD or NFKD, not {normal_form}")
    if not 0 <= eval_percent < 100:
        raise LargeForgeError(f"--eval-percent must be in [0, 100), not {eval_percent}")
    if near_dedup is not None and not 0 <= near_dedup <= 1:
        raise LargeForgeError(f"--near-dedup must be in [0, 1] (0 is off), not {near_dedup}")
    rules = QualityRules(min_chars=min_chars, max_chars=max_chars, min_alpha_ratio=min_alpha_ratio)
    check_prepared_output(Path(output), overwrite=overwrite)
    kind, records = load_dataset_records(inputs, format, text_field=text_field)
    train, evaluation, report = prepare_records(
        records, rules=rules, near_dedup_threshold=near_dedup or None,
        eval_percent=eval_percent, normal_form=normal_form,
    )
    if records and not train and not evaluation:
        removed = ", ".join(f"{reason} {count}" for reason, count in sorted(report.quality.items()))
        raise LargeForgeError(
            f"no record of {len(records)} is left after cleaning ({removed or 'duplicates'}): "
            "loosen the filters (--min-chars, --max-chars, --min-alpha-ratio); nothing written"
        )
    summary = {"inputs": _input_list(inputs), "format": kind, **report.as_dict()}
    target = write_prepared(output, train, evaluation, summary, overwrite=overwrite)
    return PreparedData(target, kind, train, evaluation, len(records), report, summary)


def split_dataset(
    inputs: str | Path | Sequence[str | Path],
    output: str | Path,
    *,
    format: str | None = None,
    text_field: str = "text",
    eval_percent: float = 10.0,
    overwrite: bool = False,
) -> PreparedData:
    """Split a dataset into train.jsonl and eval.jsonl (and report.json) in `output` by a stable
    hash, as `largeforge data split` does: adding records later never moves old ones."""
    check_prepared_output(Path(output), overwrite=overwrite)
    kind, records = load_dataset_records(inputs, format, text_field=text_field)
    train, evaluation = split_records(records, eval_percent)
    summary = {"inputs": _input_list(inputs), "format": kind, "eval_percent": eval_percent,
               "train": len(train), "eval": len(evaluation)}
    target = write_prepared(output, train, evaluation, summary, overwrite=overwrite)
    return PreparedData(target, kind, train, evaluation, len(records), None, summary)


def _input_list(inputs: str | Path | Sequence[str | Path]) -> list[str]:
    return [str(inputs)] if isinstance(inputs, (str, Path)) else [str(i) for i in inputs]
