"""Open an HTML report in headless Chromium (Debian's `chromium`) through Playwright and say what
rendered: every image's natural size, every table's row count, every request that left the
file system (there must be none: reports read offline), and a full-page screenshot kept under
`test-artifacts/` at the repository root."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
LOCAL_SCHEMES = ("file:", "data:", "about:")

_IMAGES_JS = """() => Array.from(document.images).map(img => ({
    alt: img.alt, src: img.src.slice(0, 40), complete: img.complete,
    width: img.naturalWidth, height: img.naturalHeight,
    shown: img.getBoundingClientRect().width}))"""
_TABLES_JS = """() => Array.from(document.querySelectorAll('table')).map(t => ({
    id: t.id, body_rows: Array.from(t.tBodies).reduce((n, b) => n + b.rows.length, 0),
    height: t.getBoundingClientRect().height}))"""


@dataclass
class RenderedPage:
    title: str
    text: str  # the page's visible text (document.body.innerText)
    images: list[dict] = field(default_factory=list)
    tables: dict[str, int] = field(default_factory=dict)  # table id -> rows in its bodies
    table_heights: dict[str, float] = field(default_factory=dict)
    external_requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    probes: dict[str, object] = field(default_factory=dict)  # name -> what its script returned
    screenshot: Path | None = None

    @property
    def broken_images(self) -> list[dict]:
        return [i for i in self.images if not (i["complete"] and i["width"] > 0
                                                and i["height"] > 0 and i["shown"] > 0)]


def require_chromium() -> None:
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        pytest.skip(f"headless Chromium not installed at {CHROMIUM}")
    pytest.importorskip("playwright.sync_api")


def open_in_chromium(html: Path, screenshot_name: str,
                     probes: dict[str, str] | None = None) -> RenderedPage:
    """Load `html` from disk, wait for it to finish loading, and report what rendered. Any
    request to a non-file URL is recorded and then refused, so a report that reaches for the
    network fails the test rather than hanging it. `probes` are JavaScript functions
    (`"() => ..."`) run in the page; their results come back under their names."""
    from playwright.sync_api import sync_playwright

    require_chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"{screenshot_name}.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            external: list[str] = []
            errors: list[str] = []

            def on_request(request) -> None:  # noqa: ANN001 - playwright's Request
                if not request.url.startswith(LOCAL_SCHEMES):
                    external.append(request.url)

            page.on("request", on_request)
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.route("**/*", lambda route: route.continue_()
                       if route.request.url.startswith(LOCAL_SCHEMES) else route.abort())
            page.goto(html.resolve().as_uri(), wait_until="load")
            page.wait_for_load_state("networkidle")
            tables = page.evaluate(_TABLES_JS)
            rendered = RenderedPage(
                title=page.title(),
                text=page.evaluate("() => document.body.innerText"),
                images=page.evaluate(_IMAGES_JS),
                tables={t["id"] or f"table{i}": t["body_rows"] for i, t in enumerate(tables)},
                table_heights={t["id"] or f"table{i}": t["height"] for i, t in enumerate(tables)},
                external_requests=external,
                console_errors=errors,
                probes={name: page.evaluate(js) for name, js in (probes or {}).items()},
            )
            page.screenshot(path=str(shot), full_page=True)
            rendered.screenshot = shot
        finally:
            browser.close()
    print(f"screenshot of {html.name}: {shot}")
    return rendered


def table_cells_probe(table_id: str) -> str:
    """A probe returning every body row of table `#table_id` as a list of cells: the text the
    browser shows, whether the cell is marked best, and its computed font weight."""
    return f"""() => Array.from(document.querySelectorAll('#{table_id} tbody tr')).map(tr =>
        Array.from(tr.cells).map(td => ({{text: td.innerText.trim(),
            best: td.classList.contains('best') || tr.classList.contains('best'),
            weight: Number(getComputedStyle(td).fontWeight)}})))"""


class LivePage:
    """A page of a live local web app in headless Chromium, with the console errors it logged
    and every request it made that left 127.0.0.1 (there must be none: no CDN)."""

    def __init__(self, page, external: list[str], errors: list[str]) -> None:  # noqa: ANN001
        self.page = page
        self.external_requests = external
        self.console_errors = errors

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path


@contextmanager
def live_page(origin: str, viewport: dict | None = None) -> Iterator[LivePage]:
    """A fresh headless Chromium page for the server at `origin` (http://HOST:PORT); any
    request elsewhere is recorded and refused."""
    from playwright.sync_api import sync_playwright

    require_chromium()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport=viewport or {"width": 1400, "height": 950})
            external: list[str] = []
            errors: list[str] = []
            local = (origin.rstrip("/") + "/", *LOCAL_SCHEMES)

            def route(route) -> None:  # noqa: ANN001 - playwright's Route
                if route.request.url.startswith(local):
                    route.continue_()
                else:
                    external.append(route.request.url)
                    route.abort()

            page.route("**/*", route)
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            yield LivePage(page, external, errors)
        finally:
            browser.close()
