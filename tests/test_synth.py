"""`largeforge data synth` against an OpenAI-compatible HTTP server on 127.0.0.1 started here
(it answers with the prompt's words reversed, fails some first attempts with 500 and answers
slowly enough to be killed half-way), and against a local model."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import kill_cli_when, run_cli
from largeforge.data.formats import load_records


class Endpoint(BaseHTTPRequestHandler):
    """/v1/models and /v1/chat/completions, as the OpenAI API shapes them."""

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(200, {"object": "list", "data": [
            {"id": "stub-teacher", "object": "model", "created": 0, "owned_by": "tests"}]})

    def do_POST(self) -> None:
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        server.keys.add(self.headers.get("Authorization"))  # type: ignore[attr-defined]
        with server.lock:  # type: ignore[attr-defined]
            server.attempts[prompt] += 1  # type: ignore[attr-defined]
            first = server.attempts[prompt] == 1  # type: ignore[attr-defined]
        if first and prompt.endswith("0"):  # every tenth prompt fails once: retried
            self._send(500, {"error": {"message": "try again", "type": "server_error"}})
            return
        time.sleep(server.delay)  # type: ignore[attr-defined]
        self._send(200, {
            "id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": " ".join(reversed(prompt.split()))}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })


@pytest.fixture
def endpoint():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    server.attempts, server.lock, server.delay = Counter(), threading.Lock(), 0.05
    server.keys = set()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def prompts_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"word{i} and prompt {i}"}) + "\n"
                            for i in range(n)))
    return path


def test_killed_half_way_and_rerun_loses_and_duplicates_nothing(endpoint, tmp_path):
    url = f"http://127.0.0.1:{endpoint.server_address[1]}/v1"
    prompts, out = prompts_file(tmp_path, 60), tmp_path / "synth.jsonl"
    command = [sys.executable, "-m", "largeforge.cli.main", "data", "synth", "--prompts",
               str(prompts), "--teacher", url, "--output", str(out), "--concurrency", "3",
               "--temperature", "0", "--max-tokens", "32", "--api-key", "test-key"]
    kill_cli_when(command[3:], lambda: out.is_file() and out.read_text().count("\n") >= 15,
                  timeout=120)
    written_before = out.read_text().count("\n")
    assert 15 <= written_before < 60, "killed too late to test resuming"

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "already there" in again.stdout

    records = [json.loads(line) for line in out.read_text().splitlines()]
    prompts_seen = [r["messages"][0]["content"] for r in records]
    assert sorted(prompts_seen) == sorted(f"word{i} and prompt {i}" for i in range(60))
    for record in records:  # right answers, and who made them with which settings
        user, assistant = record["messages"]
        assert assistant["content"] == " ".join(reversed(user["content"].split()))
        assert record["synth"]["teacher"] == url and record["synth"]["temperature"] == 0
        assert record["synth"]["max_tokens"] == 32
    assert max(endpoint.attempts.values()) >= 2  # the 500s were retried
    assert load_records(out).format == "messages"  # the output trains as it is


def test_alpaca_output_and_a_failing_endpoint(endpoint, tmp_path):
    url = f"http://127.0.0.1:{endpoint.server_address[1]}/v1"
    out = tmp_path / "a.jsonl"
    # The endpoint and key from the environment, as the openai client takes them.
    proc = run_cli("data", "synth", "--prompts", str(prompts_file(tmp_path, 5)), "--output",
                   str(out), "--format", "alpaca", "--model", "stub-teacher",
                   env={"OPENAI_BASE_URL": url, "OPENAI_API_KEY": "from-env"})
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 5 and all(r["synth"]["model"] == "stub-teacher" for r in records)
    assert records[0]["synth"]["teacher"] == url
    assert endpoint.keys == {"Bearer from-env"}
    assert load_records(out).format == "alpaca"

    dead = run_cli("data", "synth", "--prompts", str(prompts_file(tmp_path, 2)), "--teacher",
                   "http://127.0.0.1:9/v1", "--output", str(tmp_path / "b.jsonl"),
                   "--retries", "0", "--model", "m")
    assert dead.returncode == 1 and "2 failed" in dead.stdout
    assert "re-run" in dead.stdout


def test_a_local_model_as_teacher(tmp_path):
    from largeforge.chat_templates import get_template
    from tiny_models import make_model, make_tokenizer

    tokenizer = make_tokenizer(["word and prompt"] * 3)
    tokenizer.chat_template = get_template("chatml")
    make_model(len(tokenizer), 128).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "local.jsonl"
    proc = run_cli("data", "synth", "--prompts", str(prompts_file(tmp_path, 3)), "--teacher",
                   str(tmp_path / "teacher"), "--output", str(out), "--max-tokens", "5",
                   "--seed", "0")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and all(r["synth"]["teacher"] == str(tmp_path / "teacher")
                                     for r in records)


def test_bad_inputs(tmp_path):
    proc = run_cli("data", "synth", "--prompts", str(tmp_path / "none.txt"), "--teacher",
                   "http://127.0.0.1:9/v1", "--output", str(tmp_path / "o.jsonl"))
    assert proc.returncode == 2 and "not found" in proc.stderr
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text('{"something": "else"}\n')
    proc = run_cli("data", "synth", "--prompts", str(prompts_file(tmp_path, 2)), "--teacher",
                   "http://127.0.0.1:9/v1", "--output", str(foreign))
    assert proc.returncode == 2 and "choose another --output" in proc.stderr
    assert foreign.read_text() == '{"something": "else"}\n'  # untouched
