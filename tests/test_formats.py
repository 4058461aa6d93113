"""Data formats: detection, reading every file type, normalisation, and loading via datasets."""

from __future__ import annotations

import csv
import json

import datasets
import pytest

from largeforge.data.formats import (
    RecordProblem,
    detect_format,
    load_records,
    normalise_record,
    parse_hh_dialogue,
    read_records,
)
from largeforge.errors import LargeForgeError

ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
MESSAGES = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}]}
PREFERENCE = {"prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away."}
TEXT = {"text": "Once upon a time."}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("record, expected", [
    (ALPACA, "alpaca"), (SHAREGPT, "sharegpt"), (MESSAGES, "messages"),
    (PREFERENCE, "preference"), (TEXT, "text"),
])
def test_each_format_is_detected(tmp_path, record, expected):
    path = write_jsonl(tmp_path / "data.jsonl", [record, record])
    assert detect_format(read_records(path)) == expected


def test_shared_samples_are_detected_and_normalised(shared_data):
    alpaca = load_records(shared_data / "alpaca_sample.json")
    assert alpaca.format == "alpaca" and len(alpaca) == 2000
    first = alpaca.dataset[0]
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    assert first["messages"][0]["content"].startswith("Are the two sentences")
    assert "Sentence 1:" in first["messages"][0]["content"]  # the input follows the instruction
    assert first["source"] == f"{shared_data / 'alpaca_sample.json'}:2"  # the line it starts on

    chat = load_records(shared_data / "chat_sample.jsonl")
    assert chat.format == "sharegpt" and len(chat) == 500
    assert [m["role"] for m in chat.dataset[0]["messages"]] == [
        "user", "assistant", "user", "assistant"]
    assert chat.dataset[1]["source"].endswith("chat_sample.jsonl:2")

    hh = load_records(shared_data / "hh_rlhf_sample.jsonl")
    assert hh.format == "preference" and len(hh) == 1000
    row = hh.dataset[0]
    assert row["prompt"][0] == {"role": "user",
                                "content": "what are some pranks with a pen i can do?"}
    assert row["prompt"][-1]["role"] == "user"
    assert [m["role"] for m in row["chosen"]] == ["assistant"]
    assert row["chosen"][0]["content"].startswith("No, sorry!")
    assert row["rejected"][0]["content"].startswith("There are lots of funny things")


def test_normalised_shapes():
    assert normalise_record(TEXT, "text") == {"text": "Once upon a time."}
    assert normalise_record({**ALPACA, "system": "Be exact."}, "alpaca") == {"messages": [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]}
    assert normalise_record({"instruction": "Hi", "output": "Hello"}, "alpaca")["messages"][0] \
        == {"role": "user", "content": "Hi"}
    sharegpt = {"conversations": [{"from": "system", "value": "S"}, {"from": "user", "value": "U"},
                                  {"from": "assistant", "value": "A"}]}
    assert [m["role"] for m in normalise_record(sharegpt, "sharegpt")["messages"]] == [
        "system", "user", "assistant"]
    assert normalise_record(MESSAGES, "messages") == MESSAGES
    assert normalise_record(PREFERENCE, "preference") == {
        "prompt": [{"role": "user", "content": "Say hi"}],
        "chosen": [{"role": "assistant", "content": "Hi!"}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }


def test_preference_message_lists_share_their_prompt():
    prompt = [{"role": "user", "content": "Q"}]
    record = {"chosen": prompt + [{"role": "assistant", "content": "good"}],
              "rejected": prompt + [{"role": "assistant", "content": "bad"}]}
    assert normalise_record(record, "preference") == {
        "prompt": prompt, "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}]}
    with_prompt = {**record, "prompt": prompt}  # chosen repeats the prompt: it is cut off
    assert normalise_record(with_prompt, "preference")["chosen"] == [
        {"role": "assistant", "content": "good"}]


def test_hh_dialogues_with_the_same_last_answer_keep_it_as_the_answer():
    dialogue = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant: Bye!"
    shaped = normalise_record({"chosen": dialogue, "rejected": dialogue}, "preference")
    assert [m["content"] for m in shaped["prompt"]] == ["Hi", "Hello", "Bye"]
    assert shaped["chosen"] == shaped["rejected"] == [{"role": "assistant", "content": "Bye!"}]
    assert parse_hh_dialogue(dialogue)[1] == {"role": "assistant", "content": "Hello"}


@pytest.mark.parametrize("record, fmt, kind", [
    ({"instruction": "x"}, "alpaca", "missing_field"),
    ({"instruction": 3, "output": "y"}, "alpaca", "bad_field"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "sharegpt", "unknown_role"),
    ({"messages": [{"role": "user"}]}, "messages", "missing_field"),
    ({"chosen": "plain answer", "rejected": "other"}, "preference", "missing_field"),
    ({"body": "x"}, "text", "missing_field"),
])
def test_records_that_do_not_fit_say_why(record, fmt, kind):
    with pytest.raises(RecordProblem) as caught:
        normalise_record(record, fmt)
    assert caught.value.kind == kind


def test_text_files_directories_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("first story\n<|endoftext|>\n\nsecond story\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("# notes\n")
    loaded = load_records(tmp_path)
    assert loaded.format == "text"
    assert loaded.dataset["text"] == ["first story", "second story", "# notes"]
    assert loaded.dataset["source"][1] == f"{tmp_path / 'a.txt'}:4"
    assert len(load_records(str(tmp_path / "*.txt"))) == 2


def test_json_object_forms(tmp_path):
    columns = tmp_path / "columns.json"
    columns.write_text(json.dumps({"instruction": ["a", "b"], "output": ["1", "2"]}))
    assert load_records(columns).dataset[1]["messages"][1]["content"] == "2"
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"train": [MESSAGES, MESSAGES]}))
    assert load_records(wrapped).format == "messages"
    single = tmp_path / "single.json"
    single.write_text(json.dumps(PREFERENCE))
    assert len(load_records(single)) == 1


def test_csv_and_parquet(tmp_path):
    path = tmp_path / "data.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["instruction", "input", "output"])
        writer.writeheader()
        writer.writerow({"instruction": "Say\nhello", "input": "", "output": "hello"})
        writer.writerow({"instruction": "Count", "input": "1 2", "output": "2"})
    loaded = load_records(path)
    assert loaded.format == "alpaca"
    assert loaded.dataset["source"] == [f"{path}:2", f"{path}:4"]  # a quoted cell spans 2 lines
    assert loaded.dataset[0]["messages"][0]["content"] == "Say\nhello"

    parquet = tmp_path / "chat.parquet"
    datasets.Dataset.from_list([MESSAGES, MESSAGES]).to_parquet(str(parquet))
    loaded = load_records(parquet)
    assert loaded.format == "messages" and loaded.dataset["source"][1] == f"{parquet}:row 2"
    assert loaded.dataset[0]["messages"] == MESSAGES["messages"]


def test_save_to_disk_directory(tmp_path):
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([SHAREGPT] * 3).save_to_disk(str(saved))
    loaded = load_records(saved)
    assert loaded.format == "sharegpt" and len(loaded) == 3
    assert loaded.dataset[2]["messages"][1] == {"role": "assistant", "content": "Hello"}


def test_explicit_format_and_text_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "one"}, {"body": "two"}])
    with pytest.raises(LargeForgeError, match="cannot tell the format"):
        load_records(path)
    assert load_records(path, text_field="body").dataset["text"] == ["one", "two"]
    both = write_jsonl(tmp_path / "both.jsonl", [{**ALPACA, "text": "x"}])
    assert load_records(both, "text").dataset["text"] == ["x"]
    with pytest.raises(LargeForgeError, match="unknown format 'chatml'"):
        load_records(both, "chatml")


def test_loading_is_cached_and_multiprocess(tmp_path, shared_data):
    cache = tmp_path / "cache"
    one = load_records(shared_data / "chat_sample.jsonl", cache_dir=cache)
    entries = list((cache / "records").iterdir())
    assert len(entries) == 1
    many = load_records(shared_data / "chat_sample.jsonl", cache_dir=cache / "other", num_proc=2)
    assert many.dataset.to_list() == one.dataset.to_list()
    again = load_records(shared_data / "chat_sample.jsonl", cache_dir=cache)
    assert again.dataset.to_list() == one.dataset.to_list()
    assert list((cache / "records").iterdir()) == entries


def test_truncated_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    lines = [json.dumps(SHAREGPT)] * 5
    lines[2] = lines[2][:25]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LargeForgeError, match=rf"{path}:3: invalid JSON"):
        load_records(path)


def test_mixed_formats_in_one_file(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [ALPACA, ALPACA, SHAREGPT])
    with pytest.raises(LargeForgeError, match=r"mixed formats.*alpaca at .*:1.*sharegpt at .*:3"):
        load_records(path)


def test_binary_and_unreadable_files(tmp_path):
    binary = tmp_path / "data.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(LargeForgeError, match="binary file"):
        load_records(binary)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(LargeForgeError, match=r"latin.txt:1: not valid UTF-8"):
        load_records(latin)
    with pytest.raises(LargeForgeError, match="data file not found"):
        load_records(tmp_path / "missing.jsonl")
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    with pytest.raises(LargeForgeError, match="not a Parquet file"):
        load_records(fake)


def test_csv_with_the_wrong_header(tmp_path):
    path = tmp_path / "wrong.csv"
    path.write_text("question,answer\nWhat?,That.\n")
    with pytest.raises(LargeForgeError, match=r"wrong.csv:1: the CSV header \(question, answer\)"):
        load_records(path)
    alpaca_header = tmp_path / "half.csv"
    alpaca_header.write_text("instruction,answer\nWhat?,That.\n")
    with pytest.raises(LargeForgeError, match=r"no column 'output' for the alpaca format"):
        load_records(alpaca_header)


def test_record_that_does_not_fit_fails_the_load(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA, {"instruction": "no output"}])
    with pytest.raises(LargeForgeError, match=r"d.jsonl:2: missing field 'output'"):
        load_records(path)


def test_hub_id_offline_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LargeForgeError, match=r"'org/name' is not a local file.*could not be "
                                              r"reached.*needs a local file"):
        load_records("org/name")
