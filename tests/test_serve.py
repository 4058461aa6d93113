"""`largeforge serve inference`: a real server on 127.0.0.1 answering the official `openai`
client: completions, chat, streaming, n, seed, stop, usage, metrics, and a client that leaves
a stream early. Greedy outputs equal `largeforge generate` and `largeforge chat`'s session."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

import tiny_models
from conftest import run_cli
from largeforge.inference import (
    CHATML_TEMPLATE,
    ChatSession,
    SamplingParams,
    generate,
    load_for_inference,
)
from largeforge.inference.engine import ContinuousBatchingEngine
from largeforge.inference.generate import encode_prompt, model_eos_ids
from largeforge.serving.app import create_app
from serve_helpers import TEXT, Server, markov_model, save_tiny_model, start_server

KEY = "sk-serve-test"
NAME = "tiny-chat"
PROMPTS = ["Once upon a time", "The fox", "Hello", "In the forest there", "A", "little fox who"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("serve") / "model", chat=True)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory) -> Server:
    # The key comes from the environment; no --host: the default must be loopback.
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    srv = start_server(model_dir, log, "--served-model-name", NAME, "--max-batch-size", "4",
                       env={"LARGEFORGE_API_KEYS": KEY})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.v1, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(model_dir):
    """The same model in this process, for reference outputs."""
    return load_for_inference(model_dir, "cpu")


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_new_tokens=max_tokens)


def same_lines(text: str) -> str:
    # `run_cli` reads stdout as text, which turns a generated "\r" into "\n".
    return text.replace("\r\n", "\n").replace("\r", "\n")


def test_binds_loopback_by_default(server) -> None:
    assert server.host == "127.0.0.1"
    assert f"serving {NAME} on http://127.0.0.1:{server.port}/v1" in server.stderr()
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_models(client) -> None:
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME


def test_greedy_completion_equals_generate_cli(client, model_dir, local) -> None:
    prompt = "Once upon a time"
    result = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    cli = run_cli("generate", "--model", str(model_dir), "--prompt", prompt,
                  "--max-new-tokens", "12", "--temperature", "0")
    assert cli.returncode == 0, cli.stderr
    text = result.choices[0].text
    assert text and same_lines(text) == cli.stdout[:-1]  # the CLI ends with a newline
    model, tokenizer = local
    assert result.usage.prompt_tokens == encode_prompt(tokenizer, prompt).size(1)
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 12
    assert result.usage.total_tokens == result.usage.prompt_tokens + 12
    assert result.object == "text_completion" and result.model == NAME


def test_concurrent_greedy_requests_each_equal_generate(client, local) -> None:
    """Six prompts at once through a batch of 4: each is what it would be alone."""
    model, tokenizer = local
    lengths = [5, 17, 9, 30, 12, 21]

    def ask(i: int) -> str:
        return client.completions.create(model=NAME, prompt=PROMPTS[i], max_tokens=lengths[i],
                                         temperature=0).choices[0].text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        texts = list(pool.map(ask, range(len(PROMPTS))))
    for i, text in enumerate(texts):
        assert text == generate(model, PROMPTS[i], tokenizer, temperature=0,
                                max_new_tokens=lengths[i])


def test_chat_equals_chat_session(client, local) -> None:
    model, tokenizer = local
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello fox"}]
    result = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10,
                                            temperature=0)
    session = ChatSession(model, tokenizer, system_prompt="Be kind.", params=greedy(10))
    expected = "".join(session.send("Hello fox"))
    reply = result.choices[0].message
    assert reply.role == "assistant" and reply.content == expected
    assert result.object == "chat.completion"
    assert result.usage.prompt_tokens == session.prompt_ids(messages).size(1)


@pytest.mark.parametrize("marker_is_one_token", [False, True])
def test_chat_reply_ends_at_end_of_turn_like_chat_session(marker_is_one_token) -> None:
    """On a model whose greedy reply is known ("Hi", the end-of-turn marker, then "x" forever),
    the server's chat reply ends where `largeforge chat`'s does: at the marker, whether it is
    one special token (an EOS for this request) or several (a stop string). The app runs
    in-process here, through its library API."""
    special = ("<|im_end|>",) if marker_is_one_token else ()
    tokenizer = tiny_models.make_tokenizer(TEXT, *special)
    tokenizer.chat_template = CHATML_TEMPLATE

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    messages = [{"role": "user", "content": "Hello fox"}]
    session = ChatSession(markov_model(tokenizer, {}, 0), tokenizer, params=greedy(12))
    cue = session.prompt_ids(messages)[0, -1].item()
    chain = [cue, *ids("Hi"), *ids("<|im_end|>"), *ids("x")]
    assert len(set(chain)) == len(chain)  # a token has one successor
    model = markov_model(tokenizer, dict(zip(chain, chain[1:], strict=False)), chain[-1])
    session = ChatSession(model, tokenizer, params=greedy(12))
    expected = "".join(session.send("Hello fox"))
    assert expected == "Hi"

    engine = ContinuousBatchingEngine(model, tokenizer,
                                      eos_token_ids=model_eos_ids(model, tokenizer))
    with TestClient(create_app(engine, tokenizer, "markov")) as http:
        chat = http.post("/v1/chat/completions", json={
            "model": "markov", "messages": messages, "max_tokens": 12, "temperature": 0}).json()
        assert chat["choices"][0]["message"]["content"] == expected
        assert chat["choices"][0]["finish_reason"] == "stop"
        # A completion of the same text is not a chat turn: it runs on past the marker.
        text = tokenizer.apply_chat_template(messages, chat_template=CHATML_TEMPLATE,
                                             add_generation_prompt=True, tokenize=False)
        completion = http.post("/v1/completions", json={
            "model": "markov", "prompt": text, "max_tokens": 12, "temperature": 0}).json()
        assert completion["choices"][0]["text"].startswith("Hi<|im_end|>xx")


def test_streamed_completion_equals_whole(client) -> None:
    kwargs = dict(model=NAME, prompt="The fox", max_tokens=15, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len([t for t in texts if t]) > 1  # really streamed, piece by piece
    assert "".join(texts) == whole.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and set(finals[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_streamed_chat_sends_role_then_content(client) -> None:
    kwargs = dict(model=NAME, messages=[{"role": "user", "content": "Hello fox"}],
                  max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    content = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert content == whole.choices[0].message.content
    assert with_choices[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage == whole.usage


def test_raw_stream_is_openai_sse(server) -> None:
    """The wire format itself: `data: {json}` events, a blank line after each, `[DONE]` last."""
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.v1}/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert {p["object"] for p in payloads} == {"text_completion"}
    assert len({p["id"] for p in payloads}) == 1
    assert "usage" not in payloads[-1] or payloads[-1]["usage"] is None  # not asked for


def test_n_choices_and_seed(client) -> None:
    kwargs = dict(model=NAME, prompt="Once upon", max_tokens=8, temperature=1.0, seed=11)
    first = client.completions.create(**kwargs, n=3)
    again = client.completions.create(**kwargs, n=3)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1  # seeds 11, 12, 13 differ
    # Choice j is the request with seed + j.
    third = client.completions.create(**{**kwargs, "seed": 13})
    assert third.choices[0].text == first.choices[2].text
    # Prompt tokens once, completion tokens of every choice.
    assert first.usage.prompt_tokens == third.usage.prompt_tokens
    lengths = [8 if c.finish_reason == "length" else None for c in first.choices]
    if None not in lengths:
        assert first.usage.completion_tokens == 3 * 8


def test_chat_n_streamed(client) -> None:
    chunks = list(client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
        temperature=0, n=2, stream=True))
    text = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            text[choice.index] += choice.delta.content or ""
    assert text[0] and text[0] == text[1]  # greedy: both choices alike


def test_stop_sequence_cuts_the_text(client) -> None:
    kwargs = dict(model=NAME, prompt="In the forest there", max_tokens=20, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    stop = next(full[i:i + 2] for i in range(3, len(full) - 1)
                if full[i:i + 2].isprintable() and "\ufffd" not in full[i:i + 2])
    cut = client.completions.create(**kwargs, stop=[stop, "never-seen"]).choices[0]
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason == "stop"
    streamed = client.completions.create(**kwargs, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.text


def test_metrics_after_requests(server, client) -> None:
    before = server.metrics()
    result = client.completions.create(model=NAME, prompt="Hello", max_tokens=7, temperature=0)
    after = server.metrics()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    endpoint = 'endpoint="/v1/completions"'
    assert delta(f'largeforge_requests_total{{{endpoint},status="200"}}') == 1
    assert delta(f"largeforge_request_latency_seconds_count{{{endpoint}}}") == 1
    assert delta(f"largeforge_time_to_first_token_seconds_count{{{endpoint}}}") == 1
    assert delta(f'largeforge_request_latency_seconds_bucket{{{endpoint},le="+Inf"}}') == 1
    assert delta("largeforge_prompt_tokens_total") == result.usage.prompt_tokens
    assert delta("largeforge_completion_tokens_total") == 7
    assert delta('largeforge_generations_total{finish_reason="length"}') == 1
    assert after["largeforge_queue_depth"] == 0 and after["largeforge_running_requests"] == 0
    assert after["largeforge_max_batch_size"] == 4
    # /metrics and /health need no key: they are for the operator's scraper.
    assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_leaving_a_stream_cancels_its_generation(server) -> None:
    before = server.metrics()
    body = {"model": NAME, "prompt": "Once", "max_tokens": 1000, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.v1}/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # generation has started; now leave
    assert wait_for_cancel(server, before) < 1000  # stopped well before max_tokens


def test_leaving_a_whole_response_cancels_it(server) -> None:
    """Not streamed: a client that stops waiting (its read timeout) frees the slot too."""
    before = server.metrics()
    body = {"model": NAME, "prompt": "The fox", "max_tokens": 1000, "temperature": 0,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.v1}/completions", json=body,
                   headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(30, read=0.3))
    assert wait_for_cancel(server, before) < 1000


def wait_for_cancel(server: Server, before: dict[str, float]) -> float:
    """Wait until one more generation has ended "cancelled" and nothing runs; the number of
    tokens generated meanwhile."""
    name = 'largeforge_generations_total{finish_reason="cancelled"}'
    deadline = time.time() + 30
    while time.time() < deadline:
        after = server.metrics()
        if after.get(name, 0.0) > before.get(name, 0.0) and \
                after["largeforge_running_requests"] == 0:
            return after["largeforge_completion_tokens_total"] - before.get(
                "largeforge_completion_tokens_total", 0.0)
        time.sleep(0.05)
    pytest.fail("the engine request was not cancelled")
