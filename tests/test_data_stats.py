"""`data stats` numbers and the HTML page, on the ShareGPT sample."""

from __future__ import annotations

import json
from html.parser import HTMLParser

from largeforge.data.stats import compute_stats, write_html_report
from largeforge.tokenizer import train_tokenizer

ROLE = {"human": "user", "gpt": "assistant", "system": "system"}


def conversations(shared_data, n=120):
    lines = (shared_data / "chat_sample.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    out = []
    for line in lines:
        turns = json.loads(line)["conversations"]
        out.append({"messages": [{"role": ROLE[t["from"]], "content": t["value"]} for t in turns]})
    return out


def test_stats_of_conversations(shared_data):
    records = conversations(shared_data)
    records.append(dict(records[0]))
    stats = compute_stats(records)
    assert stats.records == 121 and stats.duplicates == 1 and stats.kind == "conversation"
    assert stats.turns == [len(r["messages"]) for r in records]
    assert stats.roles["user"] == sum(m["role"] == "user" for r in records for m in r["messages"])
    assert len(stats.lengths["assistant"]) == stats.roles["assistant"]
    assert stats.field_coverage == {"messages": 121}
    rows = dict(stats.summary_rows())
    assert rows["records"] == "121" and "median" in rows["turns per conversation"]
    json.dumps(stats.as_dict())


def test_token_lengths_with_a_tokenizer(shared_data, tmp_path):
    records = conversations(shared_data, 30)
    texts = [m["content"] for r in records for m in r["messages"]]
    tok = train_tokenizer(texts, 400, tmp_path / "tok")
    stats = compute_stats(records, tok)
    assert stats.length_unit == "tokens"
    first = records[0]["messages"][0]
    assert stats.lengths[first["role"]][0] == len(tok(first["content"],
                                                      add_special_tokens=False)["input_ids"])


def test_html_report_is_well_formed_and_has_histograms(shared_data, tmp_path):
    records = conversations(shared_data) + [{"text": "<script>alert(1)</script>"}]
    page = write_html_report(compute_stats(records), tmp_path / "r" / "stats.html", "chat <sample>")
    text = page.read_text(encoding="utf-8")
    assert text.count("<svg") >= 3  # user, assistant lengths and turns at least
    assert "<script>" not in text and "chat &lt;sample&gt;" in text

    class Checker(HTMLParser):
        def __init__(self):
            super().__init__()
            self.stack = []

        def handle_starttag(self, tag, attrs):
            if tag not in ("meta", "br"):
                self.stack.append(tag)

        def handle_endtag(self, tag):
            assert self.stack.pop() == tag

    checker = Checker()
    checker.feed(text)
    assert checker.stack == []
