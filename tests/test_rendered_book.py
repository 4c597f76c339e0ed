"""The rendered book, checked in a real browser (headless Chromium driven by Playwright).

Builds the book in the smoke profile (or uses ``$MOMLP_BUILT_BOOK``, a folder holding ``_build/html``),
serves it on 127.0.0.1, opens every page, and fails on JavaScript errors, images that did not load,
broken internal links, plotly figures that did not draw, wrong launch links or heavy pages.
Screenshots go to ``_build/screenshots`` (one PNG per page).
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
MAX_PAGE_BYTES = 10 * 1024 * 1024
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.browser


def toc_files() -> list[str]:
    """Every document of ``_toc.yml`` (without suffix), root first."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for e in entries:
            if "file" in e:
                files.append(e["file"])
            walk(e.get("sections", []))

    for part in toc.get("parts", []):
        walk(part["chapters"])
    walk(toc.get("chapters", []))
    return files


@pytest.fixture(scope="session")
def html_dir(tmp_path_factory) -> Path:
    built = os.environ.get("MOMLP_BUILT_BOOK")
    if built:
        return Path(built) / "_build" / "html"
    out = tmp_path_factory.mktemp("book")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_book.py"), "--profile", "smoke", "--out", str(out)],
        check=True,
        cwd=ROOT,
    )
    return out / "_build" / "html"


@pytest.fixture(scope="session")
def server(html_dir):
    handler = functools.partial(_QuietHandler, directory=str(html_dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output readable
        pass


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: run `bash scripts/ensure_chromium.sh` (make test does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_every_toc_page_was_built(html_dir):
    missing = [f for f in toc_files() if not (html_dir / f"{f}.html").exists()]
    assert not missing, f"pages missing from the build: {missing}"


def test_plotly_js_ships_once_and_pages_stay_light(html_dir):
    js = list(html_dir.rglob("plotly*.min.js"))
    assert [p.name for p in js] == ["plotly.min.js"], js
    for f in toc_files():
        page = html_dir / f"{f}.html"
        assert page.stat().st_size < MAX_PAGE_BYTES, f"{f}.html is {page.stat().st_size / 1e6:.1f} MB"
        text = page.read_text()
        assert "plotly.js v" not in text, f"{f}.html embeds its own copy of plotly.js"


@pytest.mark.parametrize("doc", toc_files())
def test_page_renders_in_chromium(doc, browser, server, html_dir):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    failed: list[str] = []  # local files that failed to load
    external: list[str] = []  # CDN files (MathJax, require.js): unreachable offline, fine for readers online
    page.on("requestfailed", lambda req: (failed if req.url.startswith(server) else external).append(req.url))
    page.on(
        "response",
        lambda r: failed.append(f"{r.status} {r.url}")
        if r.status >= 400 and r.url.startswith(server) and not r.url.endswith("favicon.ico")
        else None,
    )
    url = urljoin(server, f"{doc}.html")
    page.goto(url, wait_until="load")
    page.wait_for_timeout(500)

    n_figs = page.locator(".plotly-graph-div").count()
    if n_figs:
        page.wait_for_function(
            "() => [...document.querySelectorAll('.plotly-graph-div')].every(d => d.querySelector('.main-svg'))",
            timeout=30_000,
        )
    undrawn = page.evaluate(
        "() => [...document.querySelectorAll('.plotly-graph-div')].filter(d => !d._fullLayout).length"
    )
    broken_images = page.evaluate(
        "() => [...document.images].filter(i => i.complete && i.naturalWidth === 0).map(i => i.src)"
    )
    links = page.evaluate("() => [...document.querySelectorAll('a[href]')].map(a => a.href)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{doc.replace('/', '__')}.png"), full_page=True)
    page.close()

    # A resource that could not load logs a console error too; those are checked through `failed` above.
    errors = [e for e in errors if "Failed to load resource" not in e]
    assert not errors, f"{doc}: JavaScript errors {errors}"
    assert not failed, f"{doc}: requests failed {failed}"
    assert undrawn == 0, f"{doc}: {undrawn} of {n_figs} plotly figures did not draw"
    assert not broken_images, f"{doc}: images did not load {broken_images}"
    broken = [h for h in links if _internal_target(h, server, html_dir) is False]
    assert not broken, f"{doc}: broken internal links {broken}"


def _internal_target(href: str, server: str, html_dir: Path) -> bool | None:
    """True/False whether an internal link's file exists; None for external links."""
    if not href.startswith(server):
        return None
    path = unquote(urlparse(urldefrag(href)[0]).path).lstrip("/")
    target = html_dir / path
    return target.is_file() or (target / "index.html").is_file()


def test_launch_buttons_open_the_right_notebooks(html_dir):
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    repo = urlparse(cfg["repository"]["url"]).path.strip("/")
    branch = cfg["repository"]["branch"]
    notebooks = [f for f in toc_files() if (ROOT / f"{f}.ipynb").exists()]
    assert notebooks, "no notebook chapters found"
    for f in notebooks:
        html = (html_dir / f"{f}.html").read_text()
        colab = re.findall(r'href="(https://colab\.research\.google\.com/[^"]+)"', html)
        binder = re.findall(r'href="(https://mybinder\.org/[^"]+)"', html)
        assert colab == [f"https://colab.research.google.com/github/{repo}/blob/{branch}/{f}.ipynb"], colab
        assert binder and f"{f}.ipynb" in unquote(binder[0]), binder


def test_routing_page_shows_partition_with_depth_slider(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(urljoin(server, "book/routing_trees.html"), wait_until="load")
    page.wait_for_function("() => document.querySelector('.plotly-graph-div .main-svg')", timeout=30_000)
    fig = page.locator(".plotly-graph-div").first
    fig.scroll_into_view_if_needed()
    assert fig.locator("g.slider-container").count() == 1
    assert fig.locator("g.heatmaplayer image, g.heatmaplayer").count() >= 1
    # Move the slider to the last depth and check the figure now shows that depth's traces.
    labels = page.evaluate("() => document.querySelector('.plotly-graph-div').layout.sliders[0].steps.map(s => s.label)")
    page.evaluate(
        "() => { const gd = document.querySelector('.plotly-graph-div');"
        " const steps = gd.layout.sliders[0].steps; const last = steps[steps.length - 1];"
        " return Plotly.restyle(gd, last.args[0]); }"
    )
    visible = page.evaluate("() => document.querySelector('.plotly-graph-div').data.map(t => t.visible)")
    page.close()
    assert len(labels) >= 3
    assert visible[-1] is True and visible[0] is False
