"""The expert router: routing accuracy on held-out prompts, router.yaml errors, the circuit
breaker, retries and fallback against stub servers, and the router end to end: real
`largeforge serve inference` servers, the `serve router` process and the official `openai`
client, with an expert killed (SIGKILL) while requests are in flight."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO, SHARED_DATA, run_cli
from largeforge.errors import LargeForgeError
from largeforge.serving.experts import add_expert
from largeforge.serving.router_app import create_router_app
from largeforge.serving.router_config import load_router_config
from largeforge.serving.router_pools import CircuitBreaker
from largeforge.serving.router_replicas import free_port
from largeforge.serving.router_state import build_router
from largeforge.serving.routing import (
    KeywordRouter,
    read_labeled_prompts,
    routing_accuracy,
    routing_text,
)

# Keywords a user would write for these experts (not tuned on the held-out prompts).
KEYWORDS = {
    "coding": ["code", "python", "function", "program*", "sql", "html", "css", "javascript",
               "java", "algorithm", "script", "query", "array"],
    "stories": ["once upon a time", "little", "named", "play*", "happy", "mom", "friend*"],
    "shakespeare": ["thou", "thee", "thy", "thine", "hath", "doth", "lord", "king", "sir",
                    "'tis", "shall"],
    "general": [],
}
LABELS = ["coding", "general", "shakespeare", "stories"]


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# --- routing -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labeled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(training prompts, held-out prompts) made from ../shared/data by
    tests/data/router/make_labeled.py (see its docstring)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    spec = importlib.util.spec_from_file_location(
        "make_labeled", REPO / "tests" / "data" / "router" / "make_labeled.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write(SHARED_DATA, tmp_path_factory.mktemp("labeled"))


def routing_config(path: Path, **routing: str) -> Path:
    experts = [{"name": name, "urls": ["http://127.0.0.1:9"], "keywords": words}
               for name, words in KEYWORDS.items()]
    return write_yaml(path, {"experts": experts, "fallback": "general", "routing": routing})


@pytest.fixture(scope="module")
def classifier(labeled, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """`largeforge router train` on the training prompts: (its directory, the accuracy it
    printed for its own held-out split)."""
    out = tmp_path_factory.mktemp("classifier") / "clf"
    done = run_cli("router", "train", "--data", str(labeled[0]), "--output", str(out))
    assert done.returncode == 0, done.stderr
    return out, float(re.search(r"held-out accuracy: ([0-9.]+)", done.stdout).group(1))


def test_keyword_and_classifier_accuracy_on_held_out_prompts(labeled, classifier,
                                                            tmp_path) -> None:
    clf, split = classifier
    meta = json.loads((clf / "router.json").read_text(encoding="utf-8"))
    assert meta["labels"] == LABELS and meta["n_test"] > 50
    assert meta["heldout_accuracy"] == pytest.approx(split, abs=1e-4)
    heldout = read_labeled_prompts(labeled[1])
    assert len(heldout) > 90

    done = run_cli("router", "eval", "--config", str(routing_config(tmp_path / "kw.yaml")),
                   "--data", str(labeled[1]), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["method"] == "keywords" and result["prompts"] == len(heldout)
    keywords = result["accuracy"]
    config = load_router_config(routing_config(tmp_path / "clf.yaml", method="classifier",
                                               classifier=str(clf)))
    learned = routing_accuracy(build_router(config), heldout)
    print(f"\nrouting accuracy on {len(heldout)} held-out prompts: keywords {keywords:.3f}, "
          f"classifier {learned:.3f} (classifier on its own split: {split:.3f})")
    assert split >= 0.85 and learned >= 0.85
    assert keywords >= 0.6
    assert learned > keywords


def test_keyword_router() -> None:
    router = KeywordRouter({"coding": ["code", "program*", "unit test"],
                            "stories": ["story", "once upon a time"], "general": []},
                           default="general")
    assert router.route("Write Python CODE please").expert == "coding"
    assert router.route("a programming task").expert == "coding"  # prefix keyword
    assert router.route("decode this").expert == "general"  # whole words only
    assert router.route("Once  upon a\ntime, a story about a unit test").expert == "stories"
    tie = router.route("a story about code")  # one each: the expert listed first
    assert (tie.expert, tie.method, tie.score) == ("coding", "keywords", 1.0)
    assert router.route("hello").method == "default"
    with pytest.raises(LargeForgeError, match="at least one expert with keywords"):
        KeywordRouter({"a": [], "b": []}, default="a")


def test_routing_text() -> None:
    chat = {"messages": [{"role": "user", "content": "first"},
                         {"role": "assistant", "content": "answer"},
                         {"role": "user", "content": [{"type": "text", "text": "second"}]}]}
    assert routing_text(chat) == "second"
    assert routing_text({"prompt": "hi"}) == "hi"
    assert routing_text({"prompt": ["a", "b"]}) == "a\nb"
    assert routing_text({"prompt": [1, 2]}) == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--test-fraction", "1.5"], "must be in [0, 1)"),
        (["--data", "BAD"], "BAD:2: invalid JSON"),
        (["--data", "ONE"], "at least 2 labels"),
        (["--output", "FULL"], "is not empty; use --overwrite"),
    ],
)
def test_router_train_errors(tmp_path: Path, args: list[str], message: str) -> None:
    files = {
        "GOOD": '{"text": "def f(): pass", "label": "coding"}\n' * 3
        + '{"text": "a tale", "label": "stories"}\n' * 3,
        "BAD": '{"text": "x", "label": "a"}\n{oops\n',
        "ONE": '{"prompt": "x", "expert": "a"}\n' * 4,
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "FULL").mkdir()
    (tmp_path / "FULL" / "keep.txt").write_text("mine", encoding="utf-8")
    argv = {"--data": str(tmp_path / "GOOD"), "--output": str(tmp_path / "out")}
    rest = []
    for flag, value in zip(args[::2], args[1::2], strict=True):
        if flag in argv:
            argv[flag] = str(tmp_path / value)
        else:
            rest += [flag, value]
    done = run_cli("router", "train", *[x for kv in argv.items() for x in kv], *rest)
    assert done.returncode == 2, done.stdout
    assert done.stderr.startswith("error:") and message.replace("BAD", str(tmp_path / "BAD")) \
        in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "FULL" / "keep.txt").read_text(encoding="utf-8") == "mine"


# --- router.yaml errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"experts": [{"name": "a", "urls": ["http://h:1"], "keywords": "x"}], "fallbak": "a"},
         "unknown key 'fallbak' in {file}; did you mean 'fallback'?"),
        ({"experts": [{"name": "a", "urls": ["http://h:1"], "keywords": "x"}],
          "routing": {"methd": "keywords"}},
         "unknown key 'routing.methd' in {file}; did you mean 'method'?"),
        ({"experts": [{"name": "a", "url": ["http://h:1"]}]},
         "unknown key 'experts[0].url' in {file}; did you mean 'urls'?"),
        ({"experts": []}, "{file}: experts: List should have at least 1 item"),
        ({"experts": [{"name": "a", "urls": ["http://h:1"], "keywords": "x"}],
          "breaker": {"failure_threshold": 0}}, "breaker.failure_threshold: Input should be"),
        ({"experts": [{"name": "a", "urls": ["http://h:1"], "keywords": "x"}],
          "fallback": "b"}, "{file}: fallback 'b' is not one of the experts (a)"),
        ({"experts": [{"name": "a", "urls": ["http://h:1"]}]}, "no expert has keywords"),
        ({"experts": [{"name": "a", "urls": ["http://h:1"]}],
          "routing": {"method": "classifier"}}, "routing.classifier names no trained router"),
        ({"experts": [{"name": "a", "urls": ["http://h:1"]}],
          "routing": {"method": "classifier", "classifier": "nowhere"}},
         "is not a trained router"),
        ({"experts": ["unregistered"]}, "expert 'unregistered' is not in the registry"),
        ({"experts": [{"name": "a", "urls": ["http://h:1"], "keywords": "x"},
                      {"name": "a", "urls": ["http://h:2"]}]}, "expert a is listed twice"),
        ({"experts": [{"name": "a", "model": "missing-model"}]},
         "{file}: model '{dir}/missing-model' not found"),
    ],
)
def test_config_errors(tmp_path: Path, data: dict, message: str) -> None:
    path = write_yaml(tmp_path / "router.yaml", data)
    expected = message.replace("{file}", str(path)).replace("{dir}", str(tmp_path.resolve()))
    with pytest.raises(LargeForgeError) as info:
        load_router_config(path)
    assert expected in str(info.value)


def test_config_from_registry_and_classifier_labels(classifier, tmp_path: Path) -> None:
    """Registered experts by name (fields overridable); classifier labels must be experts."""
    registry = tmp_path / "reg.db"
    for name in ("coding", "stories"):
        add_expert(name, urls=[f"http://127.0.0.1:9/{name}"], keywords=name, registry=registry)
    config = write_yaml(tmp_path / "r.yaml", {
        "experts": ["coding", {"name": "stories", "keywords": ["tale"]}],
        "registry": str(registry)})
    loaded = load_router_config(config)
    assert loaded.fallback == "coding" and loaded.routing.default == "coding"
    assert loaded.expert("stories").record.keywords == ("tale",)
    assert loaded.expert("stories").record.urls == ("http://127.0.0.1:9/stories",)

    bad = write_yaml(tmp_path / "bad.yaml", {
        "experts": ["coding", "stories"], "registry": str(registry),
        "routing": {"method": "classifier", "classifier": str(classifier[0])}})
    with pytest.raises(LargeForgeError, match="routes to general, shakespeare, which are not "
                       "among the experts"):
        load_router_config(bad)


def test_serve_router_config_error_exits_2(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "router.yaml", {
        "experts": [{"name": "a", "urls": ["http://127.0.0.1:9"], "keywords": "x"}],
        "health": {"intervall": 1}})
    port = free_port()
    done = run_cli("serve", "router", "--config", str(config), "--port", str(port))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: unknown key 'health.intervall' in {config}; did "
                                   "you mean 'interval'?")


def test_circuit_breaker() -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold=2, cooldown=10, clock=lambda: now[0])
    assert breaker.acquire() and breaker.state == "closed"
    breaker.failure()
    assert breaker.state == "closed" and breaker.acquire()
    breaker.failure()
    assert breaker.state == "open" and not breaker.available()
    now[0] = 10.0
    assert breaker.state == "half_open"
    assert breaker.acquire() and not breaker.acquire()  # one trial at a time
    breaker.failure()  # the trial failed: open again for a full cool-down
    assert breaker.state == "open"
    now[0] = 19.0
    assert not breaker.available()
    now[0] = 20.0
    assert breaker.acquire()
    breaker.release()  # the client left: the trial slot is free again
    assert breaker.acquire()
    breaker.success()
    assert breaker.state == "closed" and breaker.failures == 0


# --- the router against stub servers (in this process) -----------------------------------------


class Stub:
    """A tiny server speaking the OpenAI endpoints; `fail` answers 500 to completions,
    `break_stream` breaks the connection after a stream's first chunk."""

    def __init__(self, name: str, fail: bool = False, break_stream: bool = False) -> None:
        self.name, self.fail, self.break_stream, self.calls = name, fail, break_stream, 0
        app = FastAPI()

        @app.get("/health")
        async def health() -> dict:
            return {"status": "ok", "model": self.name}

        @app.post("/v1/completions")
        @app.post("/v1/chat/completions")
        async def complete(request: Request):  # noqa: ANN202
            self.calls += 1
            body = await request.json()
            if self.fail:
                return JSONResponse({"error": {"message": "boom", "type": "server_error",
                                               "param": None, "code": None}}, status_code=500)
            if body.get("model") != self.name:
                return JSONResponse({"error": {"message": "no such model"}}, status_code=404)
            if body.get("stream"):
                async def events():  # noqa: ANN202
                    for word in ("a", "b"):
                        yield f'data: {{"choices": [{{"text": "{word}"}}]}}\n\n'
                        if self.break_stream:
                            raise RuntimeError("the server broke")
                    yield "data: [DONE]\n\n"
                return StreamingResponse(events(), media_type="text/event-stream")
            return {"object": "text_completion", "model": self.name,
                    "choices": [{"index": 0, "text": f"from {self.name}"}]}

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(),
                                                    log_level="critical"))
        self.url = f"http://127.0.0.1:{self.server.config.port}"

    def __enter__(self) -> Stub:
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join()


@pytest.fixture(scope="module")
def stubs() -> Iterator[dict[str, Stub]]:
    with Stub("good") as good, Stub("bad", fail=True) as bad, Stub("other") as other, \
            Stub("broken", break_stream=True) as broken:
        yield {"good": good, "bad": bad, "other": other, "broken": broken}


def stub_config(tmp_path: Path, experts: list[dict], **extra: object) -> object:
    data = {"experts": experts, "health": {"interval": 60}, **extra}
    return load_router_config(write_yaml(tmp_path / "router.yaml", data))


def test_5xx_is_retried_and_opens_the_breaker(stubs, tmp_path: Path) -> None:
    good, bad = stubs["good"], stubs["bad"]
    bad.calls = 0
    config = stub_config(tmp_path, [{"name": "flaky", "urls": [bad.url, good.url],
                                     "keywords": "x"}],
                         breaker={"failure_threshold": 2, "cooldown": 60})
    with TestClient(create_router_app(config)) as client:
        for _ in range(6):
            reply = client.post("/v1/completions", json={"model": "flaky", "prompt": "hi"})
            assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == "from good"
            assert reply.headers["x-largeforge-expert"] == "flaky"
            assert reply.headers["x-largeforge-replica"] == good.url
        assert bad.calls == 2  # then its breaker opened and it got no more requests
        replicas = client.get("/health").json()["experts"]["flaky"]["replicas"]
        assert [r["circuit"] for r in replicas] == ["open", "closed"]
        text = client.get("/metrics").text
        assert metric(text, "largeforge_router_upstream_failures_total", replica=bad.url,
                      reason="http_5xx") == 2
        assert metric(text, "largeforge_router_circuit_state", replica=bad.url) == 2
        assert metric(text, "largeforge_router_retries_total", expert="flaky") == 2


def test_a_stream_broken_midway_ends_with_an_error_event(stubs, tmp_path: Path) -> None:
    broken = stubs["broken"]
    config = stub_config(tmp_path, [{"name": "b", "urls": [broken.url], "keywords": "x"}])
    with TestClient(create_router_app(config)) as client:
        reply = client.post("/v1/completions", json={"model": "b", "prompt": "x",
                                                     "stream": True})
        assert reply.status_code == 200 and reply.headers["x-largeforge-expert"] == "b"
        events = [e for e in reply.text.split("\n\n") if e]
        assert json.loads(events[0].removeprefix("data: "))["choices"][0]["text"] == "a"
        error = json.loads(events[-1].removeprefix("data: "))["error"]
        assert error["type"] == "server_error" and "middle of the stream" in error["message"]
        text = client.get("/metrics").text
        assert metric(text, "largeforge_router_upstream_failures_total", replica=broken.url,
                      reason="protocol") == 1
        assert metric(text, "largeforge_router_outstanding_requests", replica=broken.url) == 0


def test_fallback_classifier_auth_and_exhaustion(stubs, classifier, tmp_path: Path) -> None:
    good, bad, other = stubs["good"], stubs["bad"], stubs["other"]
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    experts = [{"name": "coding", "urls": [dead, bad.url]},  # every replica fails
               {"name": "shakespeare", "urls": [other.url]},
               {"name": "stories", "urls": [other.url]},
               {"name": "general", "urls": [good.url]}]
    config = stub_config(tmp_path, experts, fallback="general",
                         routing={"method": "classifier", "classifier": str(classifier[0])})
    with TestClient(create_router_app(config, api_keys=["sk-router"])) as client:
        assert client.post("/v1/completions", json={"model": "auto", "prompt": "x"}
                           ).status_code == 401
        auth = {"Authorization": "Bearer sk-router"}
        reply = client.post("/v1/completions", headers=auth, json={
            "model": "auto", "prompt": "O Romeo, wherefore art thou Romeo? thy lord the king"})
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-largeforge-expert"] == "shakespeare"
        assert reply.headers["x-largeforge-route"] == "classifier"
        # coding is down (connection refused, then 500): the fallback answers.
        reply = client.post("/v1/completions", headers=auth, json={
            "model": "auto", "prompt": "Write a Python function that reverses a list."})
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == "from good"
        assert reply.headers["x-largeforge-expert"] == "general"
        assert reply.headers["x-largeforge-fallback-from"] == "coding"
        streamed = client.post("/v1/completions", headers=auth, json={
            "model": "coding", "prompt": "x", "stream": True})
        assert streamed.headers["x-largeforge-expert"] == "general"
        assert streamed.text.endswith("data: [DONE]\n\n") and '"text": "b"' in streamed.text
        text = client.get("/metrics").text
        assert metric(text, "largeforge_router_fallbacks_total", from_expert="coding",
                      to_expert="general") == 2
        replicas = client.get("/health").json()["experts"]["coding"]["replicas"]
        assert [r["healthy"] for r in replicas] == [False, True]  # dead; bad answers /health

    # Only broken replicas, no other expert: the last 5xx answer is passed on; nothing
    # listening at all is a 503 naming the expert.
    for urls, status in (([bad.url], 500), ([dead], 503)):
        config = stub_config(tmp_path, [{"name": "only", "urls": urls, "keywords": "x"}])
        with TestClient(create_router_app(config)) as client:
            reply = client.post("/v1/completions", json={"model": "only", "prompt": "x"})
            assert reply.status_code == status
            assert reply.headers["x-largeforge-expert"] == "none"
            assert "error" in reply.json()
            if status == 503:
                assert reply.json()["error"]["code"] == "expert_unavailable"
                assert "No replica of only could answer" in reply.json()["error"]["message"]
                assert metric(client.get("/metrics").text,
                              "largeforge_router_upstream_failures_total", replica=dead,
                              reason="connect") == 1
            assert client.get("/health").status_code == (503 if status == 503 else 200)


# --- end to end: real servers, the router process, the openai client ---------------------------


@dataclass
class Cluster:
    router: str
    coding: list[str]  # URLs of the two coding servers the test started
    servers: dict[str, subprocess.Popen]
    router_proc: subprocess.Popen


def _start(log: Path, *args: str) -> subprocess.Popen:
    """The CLI in the background, its output to `log` (a pipe nobody reads could fill up)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "largeforge.cli.main", *args],
            env=dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1"),
            stdout=out, stderr=subprocess.STDOUT,
        )
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _wait_healthy(url: str, procs: list[subprocess.Popen], timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            assert proc.poll() is None, proc.log.read_text()  # type: ignore[attr-defined]
        try:
            reply = httpx.get(url + "/health", timeout=2)
            if reply.status_code == 200 and reply.json().get("status") == "ok":
                return reply.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"{url} was not healthy after {timeout} s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two `serve inference` servers of `coding` started here; `general` (the fallback) is a
    model directory the router starts its own server for."""
    import tiny_models
    from largeforge.inference import CHATML_TEMPLATE

    root = tmp_path_factory.mktemp("cluster")
    tokenizer = tiny_models.make_tokenizer([
        "Once upon a time there was a little fox who lived in the forest.",
        "def reverse(items):\n    return items[::-1]\n",
    ])
    tokenizer.chat_template = CHATML_TEMPLATE
    model_dir = root / "model"
    tiny_models.make_model(len(tokenizer), 512).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    ports = [free_port(), free_port()]
    servers = {f"coding-{i}": _start(root / f"coding-{i}.log", "serve", "inference", "--model",
                                     str(model_dir), "--port", str(port))
               for i, port in enumerate(ports)}
    coding = [f"http://127.0.0.1:{port}" for port in ports]
    config = write_yaml(root / "router.yaml", {
        "experts": [
            {"name": "coding", "urls": coding, "keywords": KEYWORDS["coding"]},
            {"name": "general", "model": "model", "replicas": 1},
        ],
        "fallback": "general",
        # A generous check timeout: a 2-core machine under load answers slowly.
        "health": {"interval": 0.5, "timeout": 10},
        "breaker": {"failure_threshold": 2, "cooldown": 600},
    })
    router_port = free_port()
    router_proc = _start(root / "router.log", "serve", "router", "--config", str(config),
                         "--port", str(router_port), "--log-dir", str(root / "logs"))
    router = f"http://127.0.0.1:{router_port}"
    try:
        for url in coding:
            _wait_healthy(url, list(servers.values()))
        _wait_healthy(router, [router_proc])
        yield Cluster(router, coding, servers, router_proc)
    finally:
        for proc in [router_proc, *servers.values()]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [router_proc, *servers.values()]:
            proc.wait(timeout=30)


def test_openai_client_through_the_router(cluster: Cluster) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=cluster.router + "/v1", api_key="unused", max_retries=0)
    raw = client.completions.with_raw_response.create(
        model="auto", prompt="Write a Python function to sort a list", max_tokens=8,
        temperature=0)
    assert raw.headers["x-largeforge-expert"] == "coding"
    assert raw.headers["x-largeforge-route"] == "keywords"
    completion = raw.parse()
    assert completion.usage.completion_tokens <= 8 and isinstance(completion.choices[0].text, str)

    with client.completions.with_streaming_response.create(
            model="auto", prompt="Write a Python function to sort a list", max_tokens=8,
            temperature=0, stream=True) as streamed:
        assert streamed.headers["x-largeforge-expert"] == "coding"
        chunks = list(streamed.parse())
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text

    messages = [{"role": "user", "content": "Hello, how are you today?"}]
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=messages, max_tokens=8, temperature=0)
    assert raw.headers["x-largeforge-expert"] == "general"  # no keyword: the default
    assert raw.headers["x-largeforge-route"] == "default"
    reply = raw.parse()
    assert reply.model == "general"  # the router started it as `general`
    with client.chat.completions.with_streaming_response.create(
            model="general", messages=messages, max_tokens=8, temperature=0,
            stream=True) as streamed:
        assert streamed.headers["x-largeforge-route"] == "explicit"
        chunks = list(streamed.parse())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(chunks) > 2  # passed on chunk by chunk
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content

    assert {m.id for m in client.models.list()} == {"coding", "general", "auto"}
    assert client.models.retrieve("coding").id == "coding"


def test_errors_keep_the_expert_header(cluster: Cluster) -> None:
    reply = httpx.post(cluster.router + "/v1/completions",
                       json={"model": "gpt-4", "prompt": "x"})
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"
    assert reply.headers["x-largeforge-expert"] == "none"
    reply = httpx.post(cluster.router + "/v1/completions", content=b"{not json",
                       headers={"content-type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_json"
    # The expert's own 400 comes back as it is.
    reply = httpx.post(cluster.router + "/v1/completions",
                       json={"model": "coding", "prompt": "x", "max_tokens": -1})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "max_tokens"
    assert reply.headers["x-largeforge-expert"] == "coding"


async def _load(router: str, n: int, *, max_tokens: int = 16,
                victim: subprocess.Popen | None = None, victim_url: str | None = None,
                in_flight: int = 0) -> list[httpx.Response]:
    """`n` concurrent coding completions; with a victim, SIGKILL it once the router has
    `in_flight` requests outstanding on it."""
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(i: int) -> httpx.Response:
            return await client.post(router + "/v1/completions", json={
                "model": "auto", "prompt": f"Write python code number {i}",
                "max_tokens": max_tokens, "ignore_eos": True})

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        if victim is not None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                health = (await client.get(router + "/health")).json()
                replicas = health["experts"]["coding"]["replicas"]
                if next(r for r in replicas if r["url"] == victim_url)["outstanding"] >= in_flight:
                    break
                await asyncio.sleep(0.01)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
        return await asyncio.gather(*tasks)


def _coding_replicas_settled(cluster: Cluster, timeout: float = 60) -> list[dict]:
    """Waits until every coding replica passed its last health check with its circuit closed
    and nothing outstanding: on a loaded machine a check may time out between tests."""
    deadline = time.monotonic() + timeout
    while True:
        replicas = httpx.get(cluster.router + "/health").json()["experts"]["coding"]["replicas"]
        if all(r["healthy"] and r["circuit"] == "closed" and not r["outstanding"]
               for r in replicas) or time.monotonic() > deadline:
            return replicas
        time.sleep(0.1)


def test_least_outstanding_balances_the_replicas(cluster: Cluster) -> None:
    before = _coding_replicas_settled(cluster)
    replies = asyncio.run(_load(cluster.router, 16, max_tokens=4))
    assert all(r.status_code == 200 for r in replies)
    used = Counter(r.headers["x-largeforge-replica"] for r in replies)
    assert set(used) == set(cluster.coding) and min(used.values()) >= 4, (
        used, before, cluster.router_proc.log.read_text()[-3000:])  # type: ignore[attr-defined]


def test_a_closed_stream_releases_its_replica(cluster: Cluster) -> None:
    with httpx.stream("POST", cluster.router + "/v1/completions", json={
            "model": "coding", "prompt": "x", "max_tokens": 400, "ignore_eos": True,
            "stream": True}) as reply:
        assert reply.status_code == 200
        next(reply.iter_raw())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        replicas = httpx.get(cluster.router + "/health").json()["experts"]["coding"]["replicas"]
        if all(r["outstanding"] == 0 for r in replicas):
            break
        time.sleep(0.05)
    assert all(r["outstanding"] == 0 and r["circuit"] == "closed" for r in replicas), replicas


def test_experts_killed_under_load_lose_no_request(cluster: Cluster) -> None:
    """Runs last among the cluster tests: it kills both coding servers."""
    before = httpx.get(cluster.router + "/metrics").text
    # 1. One coding replica killed with requests in flight: they move to the other replica.
    replies = asyncio.run(_load(cluster.router, 32, victim=cluster.servers["coding-0"],
                                victim_url=cluster.coding[0], in_flight=8))
    assert [r.status_code for r in replies] == [200] * 32
    assert all(r.json()["choices"][0]["text"] for r in replies)
    assert {r.headers["x-largeforge-expert"] for r in replies} == {"coding"}
    middle = httpx.get(cluster.router + "/metrics").text
    lost = metric(middle, "largeforge_router_upstream_failures_total", replica=cluster.coding[0])
    assert lost >= 8  # requests in flight on the killed server were retried
    assert metric(middle, "largeforge_router_retries_total", expert="coding") - metric(
        before, "largeforge_router_retries_total", expert="coding") >= 8

    # 2. The other one killed too: everything is answered by the fallback expert.
    replies = asyncio.run(_load(cluster.router, 32, victim=cluster.servers["coding-1"],
                                victim_url=cluster.coding[1], in_flight=8))
    assert [r.status_code for r in replies] == [200] * 32
    assert {r.headers["x-largeforge-expert"] for r in replies} == {"general"}
    assert {r.headers["x-largeforge-fallback-from"] for r in replies} == {"coding"}
    after = httpx.get(cluster.router + "/metrics").text
    assert metric(after, "largeforge_router_upstream_failures_total",
                  replica=cluster.coding[1]) >= 8
    assert metric(after, "largeforge_router_fallbacks_total", from_expert="coding",
                  to_expert="general") - metric(
        before, "largeforge_router_fallbacks_total", from_expert="coding") == 32
    assert metric(after, "largeforge_router_requests_total", expert="general",
                  endpoint="/v1/completions", status="200") >= 32
    health = httpx.get(cluster.router + "/health").json()
    assert health["status"] == "degraded"
    assert health["experts"]["coding"]["available"] is False
    assert {r["circuit"] for r in health["experts"]["coding"]["replicas"]} == {"open"}


def test_stopping_the_router_stops_the_servers_it_started(cluster: Cluster) -> None:
    general = httpx.get(cluster.router + "/health").json()["experts"]["general"]["replicas"]
    cluster.router_proc.terminate()
    assert cluster.router_proc.wait(timeout=60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(general[0]["url"] + "/health", timeout=2)
