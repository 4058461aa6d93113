"""`largeforge infer`: outputs equal `generate()`, resume after SIGKILL, and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tiny_models
from conftest import kill_cli_when, run_cli
from largeforge.chat_templates import get_template
from largeforge.cli.main import main
from largeforge.inference import ChatSession, SamplingParams, generate, load_for_inference
from largeforge.inference.batch_infer import read_infer_records, run_infer

TEXT = [
    "Once upon a time there was a little fox who lived in the forest.",
    "The fox liked to run and jump, and every day it found something new.",
    "One day the fox met a bird. Héllo, said the bird, in a tiny wörld.",
]
WORDS = " ".join(TEXT).split()
MAX_SEQ_LEN = 128


def save_model(path: Path, chat_template: bool = True) -> Path:
    tokenizer = tiny_models.make_tokenizer(TEXT)
    if chat_template:
        tokenizer.chat_template = get_template("chatml")
    model = tiny_models.make_model(len(tokenizer), MAX_SEQ_LEN)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("infer-model"))


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_for_inference(model_dir, "cpu")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def prompts(count: int) -> list[str]:
    return [" ".join(WORDS[(3 * i) % 20 : (3 * i) % 20 + 1 + (7 * i) % 23]) for i in range(count)]


def infer(*args: str) -> int:
    """The real CLI entry point, in this process (no torch import per call)."""
    return main(["infer", *args])


def test_outputs_equal_generate_in_input_order(tmp_path, model_dir, loaded):
    model, tokenizer = loaded
    texts = prompts(9)
    records: list[dict] = [{"prompt": p} for p in texts[:6]]
    records += [{"id": f"r{i}", "prompt": p} for i, p in enumerate(texts[6:])]
    conversation = [{"role": "system", "content": "You are a fox."},
                    {"role": "user", "content": "Where do you live?"}]
    records.append({"id": "chat", "messages": conversation})
    source = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out" / "results.jsonl"
    assert infer("-m", str(model_dir), "-i", str(source), "-o", str(out), "--batch-size", "3",
                 "--temperature", "0", "--max-new-tokens", "24") == 0
    results = read_jsonl(out)
    assert [r["id"] for r in results] == [1, 2, 3, 4, 5, 6, "r0", "r1", "r2", "chat"]
    for result, prompt in zip(results, texts, strict=False):
        assert result["prompt"] == prompt
        expected = generate(model, prompt, tokenizer, max_new_tokens=24, temperature=0.0)
        assert result["output"] == expected
        assert result["finish_reason"] in ("stop", "length")
        assert result["prompt_tokens"] > 0
        assert (result["finish_reason"] == "length") == (result["completion_tokens"] == 24)
    session = ChatSession(model, tokenizer, system_prompt="You are a fox.",
                          params=SamplingParams(max_new_tokens=24, temperature=0.0))
    assert results[-1]["messages"] == conversation
    assert results[-1]["output"] == "".join(session.send("Where do you live?"))


def test_chat_flag_and_seeded_sampling(tmp_path, model_dir, loaded):
    model, tokenizer = loaded
    texts = prompts(4)[1:]
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": p}
                                                 for i, p in enumerate(texts)])
    chat_out = tmp_path / "chat.jsonl"
    assert infer("-m", str(model_dir), "-i", str(source), "-o", str(chat_out), "--chat",
                 "--temperature", "0", "--max-new-tokens", "16") == 0
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    for result, prompt in zip(read_jsonl(chat_out), texts, strict=True):
        session = ChatSession(model, tokenizer, params=params)
        assert result["output"] == "".join(session.send(prompt))
    sampled = tmp_path / "sampled.jsonl"
    assert infer("-m", str(model_dir), "-i", str(source), "-o", str(sampled), "-b", "2",
                 "--temperature", "0.9", "--seed", "7", "--max-new-tokens", "16") == 0
    for result, prompt in zip(read_jsonl(sampled), texts, strict=True):
        assert result["output"] == generate(
            model, prompt, tokenizer, max_new_tokens=16, temperature=0.9, seed=7
        )


def test_resume_after_sigkill(tmp_path, model_dir, loaded, capsys):
    """Killed mid-run (SIGKILL), with a torn last line added, a re-run finishes the rest: each
    id exactly once, in input order, with the greedy outputs of an uninterrupted run."""
    model, tokenizer = loaded
    records = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(prompts(16))]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    args = ["infer", "-m", str(model_dir), "-i", str(source), "-o", str(out), "-b", "2",
            "--temperature", "0", "--max-new-tokens", "32"]

    def some_written() -> bool:
        return out.is_file() and out.read_bytes().count(b"\n") >= 3

    kill_cli_when(args, some_written)
    written = read_jsonl(out)
    assert 3 <= len(written) < len(records)  # it really was stopped part-way
    with out.open("a", encoding="utf-8") as f:  # as if killed in the middle of a write
        f.write('{"id": "p15", "prompt": "a torn li')
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(written)} of {len(records)} records are already in" in resumed.stderr
    reference = tmp_path / "reference.jsonl"
    run_infer(model, tokenizer, read_infer_records(source), reference,
              SamplingParams(max_new_tokens=32, temperature=0.0), batch_size=5)
    final = read_jsonl(out)
    assert [r["id"] for r in final] == [r["id"] for r in records]
    assert final == read_jsonl(reference)
    assert main(args) == 0  # all done: nothing is generated or changed
    assert "nothing left to do" in capsys.readouterr().err
    assert read_jsonl(out) == final


def test_bad_json_line_through_the_installed_entry_point(tmp_path, model_dir):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "a"}\n{"prompt": \n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = run_cli("infer", "-m", str(model_dir), "-i", str(source), "-o", str(out))
    assert result.returncode == 2
    assert f"{source}:2 is not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def bad_input_cases(tmp_path: Path, model_dir: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, expected message) for each bad input."""
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "the fox"}])
    long_prompt = " ".join(WORDS * 4)
    (tmp_path / "a-dir").mkdir()
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"text": "not ours"}\n', encoding="utf-8")
    plain = save_model(tmp_path / "no-template", chat_template=False)

    def source(name: str, lines: list[str]) -> str:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return str(path)

    m = ["-m", str(model_dir)]
    out = str(tmp_path / "out.jsonl")
    return {
        "missing input": (
            [*m, "-i", str(tmp_path / "nope.jsonl"), "-o", out], "nope.jsonl not found"),
        "not JSON": ([*m, "-i", source("notjson", ['{"prompt": "a"}', "hello"]), "-o", out],
                     "notjson.jsonl:2 is not valid JSON"),
        "no prompt": ([*m, "-i", source("noprompt", ['{"prompt": "a"}', '{"text": "b"}']),
                       "-o", out], 'noprompt.jsonl:2: no "prompt"'),
        "not an object": ([*m, "-i", source("list", ['["a"]']), "-o", out],
                          "list.jsonl:1: expected a JSON object"),
        "bad messages": ([*m, "-i", source("msgs", ['{"messages": [{"role": "user"}]}']),
                          "-o", out], 'msgs.jsonl:1: "messages" must be'),
        "duplicate id": ([*m, "-i", source("dup", ['{"id": 2, "prompt": "a"}',
                                                   '{"prompt": "b"}']), "-o", out],
                         "dup.jsonl:2: id 2 is used already on line 1"),
        "empty input": ([*m, "-i", source("empty", ["", "  "]), "-o", out], "holds no records"),
        "output is a dir": ([*m, "-i", str(good), "-o", str(tmp_path / "a-dir")],
                            "is a directory"),
        "output is the input": ([*m, "-i", str(good), "-o", str(good)], "is the input file"),
        "output not ours": ([*m, "-i", str(good), "-o", str(foreign)],
                            "foreign.jsonl:1 is not a record `largeforge infer` wrote"),
        "prompt too long": ([*m, "-i", source("long", [json.dumps({"prompt": "a"}),
                                                       json.dumps({"prompt": long_prompt})]),
                             "-o", out], "long.jsonl:2: the prompt is"),
        "no chat template": (["-m", str(plain), "-i", source("chat", [
            json.dumps({"messages": [{"role": "user", "content": "hi"}]})]), "-o", out],
            "need a model with a chat template"),
        "batch size": ([*m, "-i", str(good), "-o", out, "--batch-size", "0"],
                       "--batch-size must be at least 1"),
        "bad temperature": ([*m, "-i", str(good), "-o", out, "--temperature", "-1"],
                            "temperature must be >= 0"),
    }


def test_every_bad_input_exits_2_and_writes_nothing(tmp_path, model_dir, capsys):
    cases = bad_input_cases(tmp_path, model_dir)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for name, (args, message) in cases.items():
        code = infer(*args)
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert message in " ".join(err.split()), (name, err)
        assert err.count("error:") == 1, (name, err)
        after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        assert after == before, name  # nothing written, nothing changed
