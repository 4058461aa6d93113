"""`largeforge dashboard` driven in headless Chromium (Debian's, through playwright): the runs
page, a tiny pretraining run launched from the form and watched live, stopped and resumed,
two runs compared, a streamed chat answer, a GGUF export checked in llama.cpp, bad form input
refused beside its field, and the token required off loopback. Screenshots go to
test-artifacts/dashboard-*.png."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from browser import live_page, require_chromium
from cli_contract import TEXT

# A run slow enough to watch (tens of steps a second on 2 cores) that never ends on its own.
LIVE_SETS = "\n".join([
    "tokenizer.vocab_size=300", "data.seq_len=64", "model.dim=64", "model.n_layers=2",
    "model.n_heads=4", "model.n_kv_heads=2", "train.batch_size=8", "train.log_every=5",
    "train.eval_every=100", "train.eval_batches=2",
])
BASELINE = ["--preset", "tiny", "--max-steps", "40", "--set", "tokenizer.vocab_size=300",
            "--set", "data.seq_len=32", "--set", "model.dim=32", "--set", "model.n_layers=1",
            "--set", "model.n_heads=2", "--set", "model.n_kv_heads=1",
            "--set", "train.batch_size=4", "--set", "train.eval_every=20",
            "--set", "train.log_every=5"]


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "LARGEFORGE_REGISTRY": str(root / "registry.db"),
            "PYTHONUNBUFFERED": "1"}


def start_dashboard(root: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`largeforge dashboard --port 0 ARGS` in `root`; (process, its URL)."""
    log = root / f"dashboard-{time.time_ns()}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "largeforge", "dashboard", "--port", "0", "--runs-dir",
             str(root / "runs"), *args], cwd=root, env=_env(root), stdout=out, stderr=out)
    deadline = time.time() + 90
    while time.time() < deadline:
        found = re.search(r"dashboard on (http://\S+?:\d+)/", log.read_text())
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            raise AssertionError(f"dashboard exited {proc.returncode}: {log.read_text()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"dashboard did not start: {log.read_text()}")


def _stop_runs(root: Path) -> None:
    for state in (root / "runs").glob("*/run.json"):
        pid = json.loads(state.read_text()).get("pid")
        if pid:
            try:
                os.kill(pid, 9)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[dict]:
    require_chromium()
    root = tmp_path_factory.mktemp("dashboard")
    (root / "story.txt").write_text(TEXT * 4)
    baseline = subprocess.run(
        [sys.executable, "-m", "largeforge", "train", "--data", "story.txt", "--output-dir",
         "runs", "--name", "baseline", *BASELINE], cwd=root, env=_env(root),
        capture_output=True, text=True, timeout=300)
    assert baseline.returncode == 0, baseline.stderr
    proc, url = start_dashboard(root)
    try:
        yield {"root": root, "url": url, "baseline": str((root / "runs/baseline").resolve())}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        _stop_runs(root)


def _jobs(url: str) -> list[dict]:
    return httpx.get(f"{url}/api/jobs").json()


def test_runs_page_lists_filters_and_sorts(server):
    with live_page(server["url"]) as lp:
        page = lp.page
        page.goto(server["url"] + "/")
        page.wait_for_selector("#runs tbody tr")
        row = page.locator("#runs tbody tr", has_text="baseline")
        assert "completed" in row.inner_text() and "pretrain" in row.inner_text()
        assert "40 / 40" in row.inner_text()
        page.fill("#filter", "no-such-run")
        assert page.locator("#runs tbody tr").count() == 0
        page.fill("#filter", "")
        page.click("th[data-key=name]")
        assert page.locator("th[data-key=name].sorted.asc").count() == 1
        lp.shot("dashboard-runs")
        assert not lp.external_requests and not lp.console_errors, lp.console_errors


@pytest.fixture(scope="module")
def live_run(server) -> dict:
    """A pretraining run launched from the form, watched, stopped, resumed and stopped again;
    what was seen on the way."""
    url, seen = server["url"], {}
    with live_page(url) as lp:
        page = lp.page
        page.goto(url + "/launch")
        page.fill("#f-data", str(server["root"] / "story.txt"))
        page.fill("#f-max_steps", "100000")
        page.fill("#f-run_name", "live")
        page.fill("#f-set", LIVE_SETS)
        page.click("#launch")
        page.wait_for_url("**/run?dir=**", timeout=120_000)
        run_dir = Path(server["root"] / "runs/live").resolve()
        # The step counter and the loss curve advance while the run trains.
        page.wait_for_function("() => Number(document.querySelector('#step')?.textContent) >= 10"
                               " && document.getElementById('chart-loss').data[0].x.length >= 2",
                               timeout=120_000)
        first = int(page.inner_text("#step"))
        points = page.evaluate("() => document.getElementById('chart-loss').data[0].x.length")
        page.wait_for_function(f"() => Number(document.querySelector('#step').textContent) > "
                               f"{first + 10}", timeout=60_000)
        seen["advanced"] = (first, int(page.inner_text("#step")), points,
                            page.evaluate("() => document.getElementById('chart-loss')"
                                          ".data[0].x.length"))
        assert page.inner_text("#status") == "running"
        lp.shot("dashboard-run-live")
        page.click("#stop")
        page.wait_for_function("() => document.querySelector('#status')?.textContent === "
                               "'stopped'", timeout=60_000)
        seen["stopped"] = json.loads((run_dir / "run.json").read_text())
        seen["checkpoint_after_stop"] = (run_dir / "checkpoints/latest").read_text().strip()
        page.click("#resume")
        stopped_step = seen["stopped"]["step"]
        page.wait_for_function(
            "() => document.querySelector('#status')?.textContent === 'running' && "
            f"Number(document.querySelector('#step')?.textContent) > {stopped_step + 10}",
            timeout=120_000)
        seen["resumed_step"] = int(page.inner_text("#step"))
        page.click("#stop")
        page.wait_for_function("() => document.querySelector('#status')?.textContent === "
                               "'stopped'", timeout=60_000)
        lp.shot("dashboard-run-stopped")
        seen["errors"] = list(lp.console_errors) + lp.external_requests
    seen["final"] = json.loads((run_dir / "run.json").read_text())
    seen["detail"] = httpx.get(f"{url}/api/run", params={"dir": str(run_dir)}).json()
    seen["run_dir"] = str(run_dir)
    return seen


def test_launch_watch_live_stop_and_resume(live_run):
    first, later, points_then, points_later = live_run["advanced"]
    assert later > first + 10 and points_later > points_then  # live, not a page load
    stopped = live_run["stopped"]
    assert stopped["status"] == "stopped"
    assert live_run["checkpoint_after_stop"] == f"step-{stopped['step']}"  # saved on SIGINT
    assert live_run["resumed_step"] > stopped["step"]
    final = live_run["final"]
    assert final["status"] == "stopped" and final["step"] >= live_run["resumed_step"]
    # Every action went through the CLI's command and is in the registry.
    actions = [a["action"] for a in reversed(live_run["detail"]["actions"])]
    assert actions == ["launch", "stop", "resume", "stop"]
    launch = live_run["detail"]["actions"][-1]["detail"]
    assert launch.startswith("largeforge train --data ") and "--max-steps 100000" in launch
    assert not live_run["errors"], live_run["errors"]


def test_compare_two_runs(server, live_run):
    url = server["url"]
    dirs = [server["baseline"], live_run["run_dir"]]
    with live_page(url) as lp:
        page = lp.page
        page.goto(url + "/compare?" + "&".join(f"dir={quote(d)}" for d in dirs))
        page.wait_for_function("() => document.getElementById('cmp-loss').data && "
                               "document.getElementById('cmp-loss').data.length === 2 && "
                               "document.getElementById('cmp-loss').data.every(t => t.x.length)")
        assert page.locator("#compare-table tbody tr").count() == 2
        assert page.locator("#compare-table td.best").count() >= 3
        diff = page.inner_text("#recipe-diff")
        assert "train.max_steps" in diff and "100000" in diff and "model.dim" in diff
        page.select_option("#x-axis", "tokens")
        page.wait_for_function("() => document.getElementById('cmp-loss').layout.xaxis.title"
                               ".text === 'tokens'")
        # On the tokens axis the evaluation points sit at the tokens of the step they follow.
        val_x = page.evaluate("() => document.getElementById('cmp-val').data[0].x")
        assert val_x and min(val_x) > 0
        lp.shot("dashboard-compare")
        assert not lp.console_errors and not lp.external_requests


def _latest_model(run_dir: str) -> str:
    """The run's latest checkpoint: the model a stopped run stands for."""
    run = Path(run_dir)
    return str(run / "checkpoints" / (run / "checkpoints/latest").read_text().strip())


def test_chat_streams_an_answer(server, live_run):
    url = server["url"]
    model = _latest_model(live_run["run_dir"])
    with live_page(url) as lp:
        page = lp.page
        page.goto(f"{url}/try?model={quote(model)}&run={quote(live_run['run_dir'])}")
        # A pretrained base has no chat template: the page says so and continues text instead.
        page.wait_for_function("() => document.querySelector('#template').value === 'none'")
        assert "no chat template" in page.inner_text("#template-note")
        page.fill("#chat-input", "Once upon a time")
        page.click("#chat-form button")
        page.wait_for_selector(".msg.assistant[data-done]", timeout=120_000)
        reply = page.inner_text(".msg.assistant")
        pieces = int(page.get_attribute(".msg.assistant", "data-pieces"))
        lp.shot("dashboard-chat")
        assert reply.strip() and pieces >= 2, (reply, pieces)
        assert not lp.console_errors and not lp.external_requests


def test_export_to_gguf_checked_in_llama_cpp(server, live_run):
    pytest.importorskip("llama_cpp")
    url = server["url"]
    model = _latest_model(live_run["run_dir"])
    with live_page(url) as lp:
        page = lp.page
        page.goto(f"{url}/try?model={quote(model)}&run={quote(live_run['run_dir'])}")
        page.select_option("#export-format", "gguf")
        page.click("#export-run")
        page.wait_for_selector("#export-jobs .proof", timeout=240_000)
        proof = page.inner_text("#export-jobs .proof")
        lp.shot("dashboard-export")
    assert proof.startswith("checked") and "llama.cpp" in proof, proof
    exported = list((Path(live_run["run_dir"]) / "exports").glob("model-*.gguf"))
    assert len(exported) == 1 and exported[0].read_bytes()[:4] == b"GGUF"


def test_bad_form_input_is_shown_beside_its_field_and_starts_nothing(server):
    url, root = server["url"], server["root"]
    before = (sorted(p.name for p in (root / "runs").iterdir()), len(_jobs(url)))
    with live_page(url) as lp:
        page = lp.page
        page.goto(url + "/launch")
        page.fill("#f-data", str(root / "story.txt"))
        page.fill("#f-max_steps", "many")
        page.fill("#f-run_name", "bad")
        page.click("#launch")
        error = page.locator('.field-error[data-for="max_steps"]')
        error.wait_for(timeout=30_000)
        page.wait_for_function("() => document.querySelector('.field-error[data-for=max_steps]')"
                               ".textContent.length > 0")
        assert "--max-steps takes a whole number" in error.inner_text()
        # A data file that does not exist: found by --verify-only, put beside the data field.
        page.fill("#f-max_steps", "10")
        page.fill("#f-data", str(root / "missing.txt"))
        page.click("#launch")
        page.wait_for_function("() => document.querySelector('.field-error[data-for=data]')"
                               ".textContent.includes('missing.txt')", timeout=60_000)
        assert page.inner_text('.field-error[data-for="max_steps"]') == ""
        assert page.inner_text("#launch-state") == "nothing was started"
        lp.shot("dashboard-launch-errors")
    after = (sorted(p.name for p in (root / "runs").iterdir()), len(_jobs(url)))
    assert after == before


def _lan_address() -> str | None:
    """This machine's address on its network (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))
            address = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_a_token_is_required_off_loopback(tmp_path):
    address = _lan_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address")
    refused = subprocess.run(
        [sys.executable, "-m", "largeforge", "dashboard", "--host", address, "--port", "0"],
        cwd=tmp_path, env={k: v for k, v in _env(tmp_path).items()
                           if k != "LARGEFORGE_DASHBOARD_TOKEN"},
        capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "give a token with --token" in refused.stderr
    token = "s3cret-dashboard-token"
    proc, url = start_dashboard(tmp_path, "--host", address, "--token", token)
    try:
        assert address in url
        for path in ("/", "/api/runs", "/api/runs/events", "/static/dashboard.js",
                     "/vendor/plotly.min.js"):
            assert httpx.get(url + path).status_code == 401, path
            assert httpx.get(url + path, headers={"Authorization": "Bearer wrong-token-1"}
                             ).status_code == 401, path
        assert httpx.get(url + "/api/runs", params={"token": "wrong-token-1"}).status_code == 401
        assert httpx.get(url + "/api/runs",
                         headers={"Authorization": f"Bearer {token}"}).status_code == 200
        with live_page(url) as lp:
            page = lp.page
            page.goto(f"{url}/?token={token}")
            page.wait_for_selector("#runs")
            # The page's own requests, the event stream included, carry the cookie it was given.
            status = page.evaluate("async () => { const c = new AbortController(); "
                                   "const r = await fetch('/api/runs/events', {signal: c.signal});"
                                   " c.abort(); return r.status; }")
            assert status == 200
            assert not lp.console_errors, lp.console_errors
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_a_model_from_the_dashboard(server):
    """`serve inference` started for a run's model answers the official client; stopping it
    from the dashboard ends the server process."""
    openai = pytest.importorskip("openai")
    url = server["url"]
    model = str(Path(server["baseline"]) / "final")
    job = httpx.post(f"{url}/api/serve", json={"model": model, "run": server["baseline"]},
                     timeout=30).json()["job"]
    base = job["target"]
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
    answer = client.completions.create(model=client.models.list().data[0].id,
                                       prompt="Once upon", max_tokens=4)
    assert answer.choices[0].text is not None
    # A router in front of it: the serving page shows its state.
    root = server["root"]
    (root / "router.yaml").write_text(
        f"experts:\n  - name: stories\n    urls: [{base}]\n    keywords: [fox]\n"
        "health:\n  interval: 0.5\n  timeout: 10\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        router_port = sock.getsockname()[1]
    router = subprocess.Popen(
        [sys.executable, "-m", "largeforge", "serve", "router", "--config",
         str(root / "router.yaml"), "--port", str(router_port)], cwd=root, env=_env(root),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{router_port}/health", timeout=2
                             ).json().get("status") == "ok":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        with live_page(url) as lp:
            lp.page.goto(url + "/serving")
            lp.page.wait_for_selector(".stop-server")
            assert base in lp.page.inner_text("#servers")
            lp.page.fill("#router-url", f"http://127.0.0.1:{router_port}")
            lp.page.click("#router-check")
            lp.page.wait_for_selector("#router-experts")
            state = lp.page.inner_text("#router-state")
            assert "router ok" in state and "stories" in state and "available" in state
            assert "unavailable" not in state
            lp.shot("dashboard-serving")
            lp.page.click(".stop-server")
            lp.page.wait_for_function("() => !document.querySelector('.stop-server')",
                                      timeout=30_000)
    finally:
        router.terminate()
        router.wait(timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            httpx.get(base + "/health", timeout=1)
            time.sleep(0.5)
        except httpx.HTTPError:
            break
    else:
        raise AssertionError("the server still answers after it was stopped")
