"""The cleaning steps of `data prepare`: normalisation, dedup, quality rules and the split."""

from __future__ import annotations

import json

import pytest

from largeforge.data.cleaning import (
    NearDuplicateFinder,
    QualityRules,
    exact_key,
    in_eval_split,
    normalize_record,
    normalize_text,
    prepare_records,
    record_text,
)
from largeforge.errors import LargeForgeError


def test_normalize_text_composes_and_strips_controls():
    decomposed = "Cafe\u0301 \x00bell\x07 tab\tok\r\nnext\rline\x9b"
    assert normalize_text(decomposed) == "Caf\u00e9 bell tab\tok\nnext\nline"
    assert normalize_text("\ufb01ne") == "\ufb01ne"  # NFC keeps the ligature
    assert normalize_text("\ufb01ne", "NFKC") == "fine"
    family = "family \U0001f468\u200d\U0001f469"  # the zero-width joiner is not a control
    assert normalize_text(family) == family


def test_normalize_record_walks_messages():
    record = {"messages": [{"role": "user", "content": "a\x00b"}], "n": 3}
    assert normalize_record(record) == {"messages": [{"role": "user", "content": "ab"}], "n": 3}


def test_record_text_of_each_kind():
    assert record_text({"text": "plain"}) == "plain"
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert record_text(chat) == "hi\nyo"
    pref = {"prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}]}
    assert record_text(pref) == "q\ngood\nbad"


def test_exact_key_ignores_case_and_whitespace_only():
    assert exact_key("Hello   World\n") == exact_key("hello world")
    assert exact_key("hello world") != exact_key("hello world!")


def test_near_duplicates_found_and_distinct_texts_kept():
    base = ("the quick brown fox jumps over the lazy dog while the farmer watches from the "
            "old wooden fence and the sun sets slowly behind the distant green hills")
    finder = NearDuplicateFinder(threshold=0.7)
    assert finder.match_or_add(base) is None
    assert finder.match_or_add(base.replace("sun sets", "sun sinks")) is not None
    other = ("a completely different sentence about compilers, parsers and the many "
             "passes that turn source text into machine code for a small computer")
    assert finder.match_or_add(other) is None
    with pytest.raises(LargeForgeError):
        NearDuplicateFinder(threshold=0)


@pytest.mark.parametrize("text,problem", [
    ("", "too_short"),
    ("1234 5678 %%%% #### 0000 ++++ ", "low_alpha_ratio"),
    ("same line\nsame line\nsame line\nother line\n", "repeated_lines"),
    ("buy now " * 30, "repeated_ngrams"),
    ("An ordinary sentence, with words that do not repeat much at all, is fine.", None),
])
def test_quality_rules(text, problem):
    assert QualityRules().problem(text) == problem
    assert QualityRules(max_chars=10).problem("x" * 11) == "too_long"


def test_split_is_stable_when_records_are_added(shared_data):
    records = json.loads((shared_data / "alpaca_sample.json").read_text(encoding="utf-8"))
    texts = [r["instruction"] + r.get("input", "") + r["output"] for r in records]
    first = {t for t in texts[:300] if in_eval_split(t, 10)}
    later = {t for t in texts if in_eval_split(t, 10)}
    assert first == later & set(texts[:300])
    assert 0.05 < len(later) / len(texts) < 0.15


def test_prepare_records_counts_every_step(shared_data):
    records = [json.loads(line) for line in
               (shared_data / "chat_sample.jsonl").read_text(encoding="utf-8").splitlines()[:200]]
    texts = [{"text": "\n".join(t["value"] for t in r["conversations"])} for r in records]
    noisy = texts + [dict(texts[0]), {"text": texts[1]["text"].upper()}, {"text": "!!!! ????"},
                     {"text": texts[2]["text"] + " extra"}, {"text": "Tab\x00 control ok words"}]
    train, evaluation, report = prepare_records(noisy, near_dedup_threshold=0.8, eval_percent=10)
    assert report.records_in == len(noisy)
    assert report.exact_duplicates >= 2
    assert report.near_duplicates >= 1
    assert report.quality.get("low_alpha_ratio", 0) >= 1
    assert report.normalized_changed >= 1
    kept = report.records_in - report.exact_duplicates - report.near_duplicates - sum(
        report.quality.values())
    assert len(train) + len(evaluation) == kept == report.train + report.eval
    assert all("\x00" not in record_text(r) for r in train + evaluation)
    again = prepare_records(noisy, near_dedup_threshold=0.8, eval_percent=10)
    assert again[0] == train and again[1] == evaluation
    json.dumps(report.as_dict())
