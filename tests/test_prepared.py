"""Writing prepared data: atomic, never replacing an output without overwrite; the split alone."""

from __future__ import annotations

import json

import pytest

from largeforge.data.prepared import split_records, write_prepared
from largeforge.errors import LargeForgeError


def records(n: int) -> list[dict]:
    return [{"text": f"record number {i} with some words"} for i in range(n)]


def test_split_is_stable_and_complete():
    train, evaluation = split_records(records(500), 10)
    assert len(train) + len(evaluation) == 500 and 25 < len(evaluation) < 80
    more_train, more_eval = split_records(records(800), 10)
    assert more_eval[:len(evaluation)] == evaluation
    assert split_records(records(50), 0)[1] == []
    with pytest.raises(LargeForgeError):
        split_records(records(3), 100)


def test_write_prepared_and_refuse_to_replace(tmp_path):
    train, evaluation = split_records(records(40), 20)
    out = write_prepared(tmp_path / "out", train, evaluation, {"train": len(train)})
    lines = (out / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == train
    assert len((out / "eval.jsonl").read_text(encoding="utf-8").splitlines()) == len(evaluation)
    assert json.loads((out / "report.json").read_text())["train"] == len(train)
    before = (out / "train.jsonl").read_bytes()
    with pytest.raises(LargeForgeError, match="overwrite"):
        write_prepared(out, [], [], {})
    assert (out / "train.jsonl").read_bytes() == before
    write_prepared(out, [], [], {}, overwrite=True)
    assert (out / "train.jsonl").read_text() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left behind
