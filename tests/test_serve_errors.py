"""Limits and safety of `largeforge serve inference`, on a real server: every bad request gets
the right status and an OpenAI-style error body; keys (flag, environment, file), the per-key
rate limit (429 + Retry-After), a full queue (503) and the CLI's own errors."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import run_cli
from serve_helpers import Server, save_tiny_model, start_server

MAIN, ENV_KEY, RATE, FLOOD = "k-main", "k-env", "k-rate", "k-flood"
RATE_LIMIT = 60  # per minute per key: a bucket of 60, refilled at one a second
CONTEXT = 128


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # No chat template, a short context, so those errors can be asked for.
    return save_tiny_model(tmp_path_factory.mktemp("serve-errors") / "plain", chat=False,
                           max_seq_len=CONTEXT)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory) -> Server:
    tmp = tmp_path_factory.mktemp("serve-errors-run")
    key_file = tmp / "keys.txt"
    key_file.write_text(f"# keys of the test\n{RATE}\n\n{FLOOD}\n", encoding="utf-8")
    srv = start_server(
        model_dir, tmp / "server.log", "--api-key", MAIN, "--api-key-file", str(key_file),
        "--rate-limit", str(RATE_LIMIT), "--max-queue", "1", "--max-batch-size", "1",
        env={"LARGEFORGE_API_KEYS": f" {ENV_KEY} ,"},
    )
    yield srv
    srv.stop()


def post(server: Server, path: str, body: object = None, *, key: str | None = MAIN,
         content: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.v1}{path}", json=body if content is None else None,
                      content=content, headers=headers, timeout=60)


def assert_error(response: httpx.Response, status: int, code: str | None,
                 param: str | None = None, kind: str = "invalid_request_error") -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == kind and error["code"] == code and error["param"] == param
    assert error["message"]
    return error["message"]


COMPLETION = {"model": "plain", "prompt": "Once upon", "max_tokens": 4}


@pytest.mark.parametrize(
    ("body", "param", "code", "words"),
    [
        ({**COMPLETION, "max_tokens": "5"}, "max_tokens", "invalid_value", "valid integer"),
        ({**COMPLETION, "temperature": "hot"}, "temperature", "invalid_value", "valid number"),
        ({**COMPLETION, "stream": "yes"}, "stream", "invalid_value", "valid boolean"),
        ({**COMPLETION, "prompt": {"text": "hi"}}, "prompt", "invalid_type", "expected one of"),
        ({**COMPLETION, "max_tokens": -1}, "max_tokens", "invalid_value", "greater than"),
        ({**COMPLETION, "n": 1000}, "n", "invalid_value", "less than or equal to 8"),
        ({**COMPLETION, "n": 0}, "n", "invalid_value", "greater than"),
        ({**COMPLETION, "temperature": 5}, "temperature", "invalid_value", "less than"),
        ({**COMPLETION, "top_p": 0}, "top_p", "invalid_value", "greater than"),
        ({**COMPLETION, "logprobs": 3}, "logprobs", "invalid_value", "not supported"),
        ({**COMPLETION, "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value", "at most 4"),
        ({**COMPLETION, "frobnicate": 1}, "frobnicate", "unknown_parameter", "Unrecognized"),
        ({**COMPLETION, "seed": -(10**23)}, "seed", "invalid_value", "greater than or equal"),
        ({**COMPLETION, "seed": 2**64}, "seed", "invalid_value", "less than or equal"),
        ({"model": "plain"}, "prompt", "missing_required", "Missing required"),
        ({**COMPLETION, "prompt": [5, 99999]}, "prompt", "invalid_value", "vocabulary"),
        ({**COMPLETION, "max_tokens": CONTEXT}, "prompt", "context_length_exceeded",
         f"maximum context length is {CONTEXT}"),
        ({**COMPLETION, "prompt": "fox " * 200, "max_tokens": 1}, "prompt",
         "context_length_exceeded", "Please reduce"),
    ],
)
def test_bad_completion_requests(server, body, param, code, words) -> None:
    message = assert_error(post(server, "/completions", body), 400, code, param)
    assert words in message


def test_bad_streaming_request_is_plain_json(server) -> None:
    """Refused before streaming starts: a JSON error, not an event stream."""
    assert_error(post(server, "/completions", {**COMPLETION, "stream": True, "n": 99}), 400,
                 "invalid_value", "n")


@pytest.mark.parametrize(
    ("content", "code", "words"),
    [
        (b'{"model": "plain", "prompt": ', "invalid_json", "could not parse"),
        (b"", "invalid_json", "needs a JSON body"),
        (b"[1, 2]", "invalid_type", "JSON object"),
        (b"\xff\xfe", "invalid_json", "could not parse"),
    ],
)
def test_invalid_json(server, content, code, words) -> None:
    assert words in assert_error(post(server, "/completions", content=content), 400, code)


@pytest.mark.parametrize(
    ("path", "content", "param", "words"),
    [  # text the encoders refuse (issue 18, class 3): a 400, never a 500
        ("/completions", b'{"model": "plain", "prompt": "fox \\ud800 den"}', "prompt",
         "lone surrogate \\ud800"),
        ("/chat/completions", b'{"model": "plain", "messages": [{"role": "user", "content": '
         b'"hi"}, {"role": "user", "content": "\\uDC00"}]}', "messages.1.content",
         "lone surrogate \\udc00"),
        ("/completions", b'{"model": "plain", "prompt": "\xed\xa0\x80"}', None,
         "could not parse"),  # the surrogate as UTF-8 bytes, which UTF-8 forbids
        ("/completions", b'{"model": "plain", "prompt": ' + b"[" * 100_000 + b"]" * 100_000
         + b"}", None, "nested more than 100 levels deep"),
    ],
    ids=["surrogate-prompt", "surrogate-message", "surrogate-as-bytes", "nested-deep"],
)
def test_text_the_encoders_refuse_is_400(server, path, content, param, words) -> None:
    assert words in assert_error(post(server, path, content=content), 400, "invalid_json", param)


def test_a_body_with_a_bom_is_read(server) -> None:
    body = b"\xef\xbb\xbf" + json.dumps({**COMPLETION, "max_tokens": 1}).encode()
    assert post(server, "/completions", content=body).status_code == 200


def test_huge_body_is_413(server) -> None:
    content = b'{"model": "plain", "prompt": "' + b"x" * (5 * 2**20) + b'"}'
    assert "larger than" in assert_error(post(server, "/completions", content=content), 413,
                                         "request_too_large")


def test_bad_chat_requests(server) -> None:
    chat = {"model": "plain", "messages": [{"role": "user", "content": "hi"}]}
    assert_error(post(server, "/chat/completions", {**chat, "messages": "hi"}), 400,
                 "invalid_value", "messages")
    assert_error(post(server, "/chat/completions", {**chat, "messages": []}), 400,
                 "invalid_value", "messages")
    assert_error(post(server, "/chat/completions",
                      {**chat, "messages": [{"role": "robot", "content": "x"}]}),
                 400, "invalid_value", "messages.0.role")
    # This model has no chat template.
    message = assert_error(post(server, "/chat/completions", chat), 400, "no_chat_template",
                           "messages")
    assert "--chat-template" in message


def test_unknown_model_is_404_like_openai(server) -> None:
    for path, body in (("/completions", {**COMPLETION, "model": "gpt-9"}),
                       ("/chat/completions", {"model": "gpt-9",
                                              "messages": [{"role": "user", "content": "x"}]})):
        message = assert_error(post(server, path, body), 404, "model_not_found", "model",
                               "not_found_error")
        assert "gpt-9" in message
    response = httpx.get(f"{server.v1}/models/gpt-9", headers={"Authorization": f"Bearer {MAIN}"})
    assert_error(response, 404, "model_not_found", "model", "not_found_error")
    client = OpenAI(base_url=server.v1, api_key=MAIN, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x", max_tokens=1)


def test_unknown_route_and_method(server) -> None:
    headers = {"Authorization": f"Bearer {MAIN}"}
    assert_error(httpx.get(f"{server.v1}/engines", headers=headers), 404, None)
    assert_error(httpx.get(f"{server.v1}/completions", headers=headers), 405, None)


def test_keys_from_flag_environment_and_file(server) -> None:
    for key in (MAIN, ENV_KEY, RATE):
        client = OpenAI(base_url=server.v1, api_key=key, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["plain"]
    result = OpenAI(base_url=server.v1, api_key=MAIN, max_retries=0).completions.create(
        model="plain", prompt="Once", max_tokens=3, temperature=0)
    assert result.usage.completion_tokens <= 3


def test_missing_or_wrong_key_is_401(server) -> None:
    assert "didn't provide an API key" in assert_error(
        post(server, "/completions", COMPLETION, key=None), 401, "invalid_api_key",
        kind="authentication_error")
    for key in ("k-wrong", MAIN + "x", MAIN[:-1]):
        assert "Incorrect API key" in assert_error(
            post(server, "/completions", COMPLETION, key=key), 401, "invalid_api_key",
            kind="authentication_error")
    basic = httpx.get(f"{server.v1}/models", headers={"Authorization": f"Basic {MAIN}"})
    assert_error(basic, 401, "invalid_api_key", kind="authentication_error")
    # Checked before the body: a bad body without a key is still 401.
    assert_error(post(server, "/completions", content=b"{oops", key=None), 401,
                 "invalid_api_key", kind="authentication_error")
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=server.v1, api_key="k-wrong", max_retries=0).models.list()
    # Health and metrics stay open.
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_rate_limit_is_429_with_retry_after(server) -> None:
    headers = {"Authorization": f"Bearer {RATE}"}
    start = time.perf_counter()
    allowed = 0
    while allowed <= 3 * RATE_LIMIT:
        response = httpx.get(f"{server.v1}/models", headers=headers)
        if response.status_code != 200:
            break
        allowed += 1
    elapsed = time.perf_counter() - start
    # A full bucket (less the request of test_keys... when it ran) plus what refilled meanwhile.
    assert RATE_LIMIT - 1 <= allowed <= RATE_LIMIT + elapsed * RATE_LIMIT / 60 + 1
    message = assert_error(response, 429, "rate_limit_exceeded", kind="rate_limit_error")
    assert f"{RATE_LIMIT:g} requests per minute" in message
    assert 1 <= int(response.headers["retry-after"]) <= 60 // RATE_LIMIT + 1
    with pytest.raises(openai.RateLimitError):
        OpenAI(base_url=server.v1, api_key=RATE, max_retries=0).models.list()
    # Another key has its own bucket.
    assert httpx.get(f"{server.v1}/models",
                     headers={"Authorization": f"Bearer {MAIN}"}).status_code == 200


def test_full_queue_is_503(server) -> None:
    """One batch slot and one queue place: of four long requests at once, one runs, one
    waits, the others get 503 at once; the server keeps serving."""
    body = {**COMPLETION, "max_tokens": 60, "ignore_eos": True, "temperature": 0}
    responses: list[httpx.Response] = []
    lock = threading.Lock()

    def ask() -> None:
        response = post(server, "/completions", body, key=FLOOD)
        with lock:
            responses.append(response)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(r.status_code for r in responses)
    assert 503 in statuses and set(statuses) <= {200, 503}, statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert "queue is full" in assert_error(refused, 503, "server_overloaded",
                                          kind="overloaded_error")
    assert refused.headers["retry-after"] == "1"
    ok = [r.json() for r in responses if r.status_code == 200]
    assert ok and all(r["usage"]["completion_tokens"] == 60 for r in ok)
    assert post(server, "/completions", COMPLETION, key=FLOOD).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'largeforge_requests_total{endpoint="/v1/completions",status="503"}' in metrics


def test_metrics_count_errors(server) -> None:
    def count(status: str) -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("largeforge_requests_total") and f'"{status}"' in line)

    before = {s: count(s) for s in ("400", "401", "404")}
    post(server, "/completions", {**COMPLETION, "n": 99})
    post(server, "/completions", COMPLETION, key=None)
    post(server, "/completions", {**COMPLETION, "model": "nope"})
    assert {s: count(s) - before[s] for s in before} == {"400": 1, "401": 1, "404": 1}


# --- the command line -----------------------------------------------------------------------


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_cli_errors(tmp_path, model_dir) -> None:
    serve = ("serve", "inference", "--model")
    assert "not found" in one_error_line(run_cli(*serve, str(tmp_path / "missing")))
    assert "--max-batch-size" in one_error_line(
        run_cli(*serve, str(model_dir), "--max-batch-size", "0"))
    assert "rate limit" in one_error_line(run_cli(*serve, str(model_dir), "--rate-limit", "0"))
    assert "--threads" in one_error_line(run_cli(*serve, str(model_dir), "--threads", "0"))
    empty = tmp_path / "keys.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    assert "holds no key" in one_error_line(
        run_cli(*serve, str(model_dir), "--api-key-file", str(empty)))
    assert "cannot read the API key file" in one_error_line(
        run_cli(*serve, str(model_dir), "--api-key-file", str(tmp_path / "nope.txt")))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_error_line(run_cli(*serve, str(model_dir), "--port", str(port)))
    assert f"cannot listen on 127.0.0.1:{port}" in line
    assert list(tmp_path.iterdir()) == [empty]  # nothing written


def test_error_bodies_parse_as_openai_errors(server) -> None:
    """The official client reads our error body: status, message and code."""
    client = OpenAI(base_url=server.v1, api_key=MAIN, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="plain", prompt="x", max_tokens=-1)
    assert info.value.status_code == 400
    assert info.value.code == "invalid_value" and info.value.param == "max_tokens"
    assert json.loads(info.value.response.text)["error"]["param"] == "max_tokens"
