"""The rendered book, checked in a real browser (headless Chromium driven by Playwright).

Builds the book in the smoke profile (or uses ``$MOMLP_BUILT_BOOK``, a folder holding ``_build/html``),
serves it on 127.0.0.1 with every other host blocked (as offline as a reader without network), opens every page
and every chapter's reveal.js deck, and fails on JavaScript errors, images that did not load, broken internal
links, plotly figures that did not draw, wrong launch links, heavy pages, MathJax errors, formulas MathJax did not
typeset, and raw TeX delimiters left in the text after rendering. Each deck is paged through to its last slide.
Screenshots go to ``_build/screenshots`` (one PNG per page, two per deck) and page weights to
``_build/screenshots/weights.json``.
"""

from __future__ import annotations

import functools
import http.server
import json
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
# Everything a page or deck downloads (HTML + plotly.js + MathJax + fonts ...), locally served.
MAX_LOADED_BYTES = 20 * 1024 * 1024
WEIGHTS: dict[str, int] = {}

# Wait for MathJax 3 (served from _static) to finish; then count its errors and the math it left untypeset.
MATHJAX_DONE_JS = """async () => {
  if (!window.MathJax || !MathJax.startup || !MathJax.startup.promise) return {loaded: false};
  await MathJax.startup.promise;
  const math = [...document.querySelectorAll('.math, span.math, div.math')];
  return {
    loaded: true,
    version: MathJax.version,
    errors: [...document.querySelectorAll('mjx-merror')].map(e => e.getAttribute('data-mjx-error') || e.textContent),
    untypeset: math.filter(m => !m.querySelector('mjx-container')).map(m => m.textContent.slice(0, 80)),
    typeset: document.querySelectorAll('mjx-container').length,
  };
}"""
# Text a reader sees (code, scripts, figures and typeset math left out) that still holds TeX delimiters.
RAW_TEX_JS = r"""() => {
  const skip = 'PRE,CODE,SCRIPT,STYLE,TEXTAREA,MJX-CONTAINER,SVG,NOSCRIPT';
  const out = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {
    acceptNode: n => {
      for (let e = n.parentElement; e; e = e.parentElement) {
        if (skip.split(',').includes(e.tagName.toUpperCase()) || e.classList.contains('plotly-graph-div')) {
          return NodeFilter.FILTER_REJECT;
        }
      }
      return NodeFilter.FILTER_ACCEPT;
    }
  });
  const raw = /\\\(|\\\)|\\\[|\\\]|\$\$|\\begin\{|\$[^\s$][^$\n]{0,120}[^\s$\\]\$|\$[^\s$]\$/;
  while (walker.nextNode()) {
    const t = walker.currentNode.textContent;
    if (raw.test(t)) out.push(t.trim().slice(0, 100));
  }
  return out;
}"""
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
    """Every document of ``_toc.yml`` (without suffix), root first: the course kit's one toc walk."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from build_course import toc_files as walk_toc

    return walk_toc()


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
    _offline(page, server)
    page.on(
        "response",
        lambda r: failed.append(f"{r.status} {r.url}")
        if r.status >= 400 and r.url.startswith(server) and not r.url.endswith("favicon.ico")
        else None,
    )
    url = urljoin(server, f"{doc}.html")
    page.goto(url, wait_until="load", timeout=120_000)
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
    has_math = page.locator(".math").count() > 0
    mathjax = page.evaluate(MATHJAX_DONE_JS)
    raw_tex = page.evaluate(RAW_TEX_JS)
    loaded = _loaded_bytes(page)
    _record_weight(f"{doc}.html", loaded)
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
    if has_math:
        assert mathjax["loaded"] and mathjax["version"].startswith("3."), f"{doc}: MathJax 3 did not load offline"
        assert not mathjax["errors"], f"{doc}: MathJax errors {mathjax['errors']}"
        assert not mathjax["untypeset"], f"{doc}: formulas MathJax did not typeset {mathjax['untypeset'][:5]}"
    assert not raw_tex, f"{doc}: raw TeX left in the rendered text {raw_tex[:5]}"
    assert loaded < MAX_LOADED_BYTES, f"{doc}: the page loads {loaded / 1e6:.1f} MB"


def _offline(page, server: str) -> None:
    """Block every host but the local server: the page must work without network (MathJax included)."""
    # Only requests to other hosts are intercepted (local ones never pass through Python).
    page.route(re.compile("^(?!" + re.escape(server) + ")"), lambda route: route.abort())


def _loaded_bytes(page) -> int:
    """Bytes the page downloaded: its HTML plus every resource (scripts, styles, fonts, images)."""
    return int(page.evaluate(
        "() => [performance.getEntriesByType('navigation')[0], ...performance.getEntriesByType('resource')]"
        ".reduce((s, e) => s + (e.encodedBodySize || 0), 0)"
    ))


def _record_weight(name: str, nbytes: int) -> None:
    WEIGHTS[name] = nbytes
    SHOTS.mkdir(parents=True, exist_ok=True)
    (SHOTS / "weights.json").write_text(json.dumps(dict(sorted(WEIGHTS.items())), indent=2) + "\n")


def _chapters() -> list[str]:
    return [f.split("/")[-1] for f in toc_files() if (ROOT / f"{f}.ipynb").exists()]


def test_every_chapter_has_a_deck_that_loads_nothing_from_the_network(html_dir):
    missing = [c for c in _chapters() if not (html_dir / "slides" / f"{c}.slides.html").exists()]
    assert not missing, f"chapters without a deck: {missing}"
    for c in _chapters():
        text = (html_dir / "slides" / f"{c}.slides.html").read_text()
        external = re.findall(r"""<(?:script|link)[^>]+(?:src|href)=["'](https?://[^"']+)""", text)
        assert not external, f"{c} deck loads {external}"
        assert "../_static/revealjs/dist/reveal.js" in text and "../_static/mathjax/" in text
    assert (html_dir / "_static" / "revealjs" / "dist" / "reveal.js").is_file()
    assert (html_dir / "_static" / "mathjax" / "tex-mml-chtml.js").is_file()


@pytest.mark.parametrize("chapter", _chapters())
def test_deck_pages_through_in_chromium(chapter, browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    failed: list[str] = []
    page.on("requestfailed", lambda req: failed.append(req.url))
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    _offline(page, server)
    page.goto(urljoin(server, f"slides/{chapter}.slides.html"), wait_until="load", timeout=120_000)
    page.wait_for_function("() => window.Reveal && Reveal.isReady()", timeout=30_000)
    page.evaluate("() => Reveal.configure({transition: 'none', backgroundTransition: 'none'})")
    mathjax = page.evaluate(MATHJAX_DONE_JS)
    total = page.evaluate("() => Reveal.getTotalSlides()")
    seen, shots, undrawn = 1, 0, []
    SHOTS.mkdir(parents=True, exist_ok=True)
    while True:
        slide_has_math = page.evaluate("() => Reveal.getCurrentSlide().querySelectorAll('mjx-container').length > 0")
        if (shots == 0 or slide_has_math) and shots < 2:
            page.wait_for_timeout(300)
            page.screenshot(path=str(SHOTS / f"slides__{chapter}__{shots + 1}.png"))
            shots += 1
        undrawn += page.evaluate(
            "() => [...Reveal.getCurrentSlide().querySelectorAll('.plotly-graph-div')]"
            ".filter(d => !d._fullLayout).map(d => d.id)"
        )
        if page.evaluate("() => Reveal.isLastSlide()") or seen > 500:
            break
        page.evaluate("() => Reveal.next()")
        seen += 1
    raw_tex = page.evaluate(RAW_TEX_JS)
    loaded = _loaded_bytes(page)
    _record_weight(f"slides/{chapter}.slides.html", loaded)
    page.close()

    errors = [e for e in errors if "Failed to load resource" not in e]
    assert not errors, f"{chapter} deck: JavaScript errors {errors}"
    assert not failed, f"{chapter} deck: requests failed or went to the network {failed}"
    assert total >= 3, f"{chapter} deck has only {total} slides"
    assert seen == total, f"{chapter} deck: paged through {seen} of {total} slides"
    assert mathjax["loaded"] and not mathjax["errors"], f"{chapter} deck: MathJax {mathjax}"
    assert not mathjax["untypeset"]
    assert not raw_tex, f"{chapter} deck: raw TeX left after rendering {raw_tex[:5]}"
    assert not undrawn, f"{chapter} deck: plotly figures that did not draw {undrawn}"
    assert loaded < MAX_LOADED_BYTES, f"{chapter} deck loads {loaded / 1e6:.1f} MB"


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


def test_the_math_checks_can_fail(browser, server):
    """The raw-TeX and MathJax-error checks flag a broken page (so a green run means rendered math)."""
    page = browser.new_page()
    _offline(page, server)
    page.set_content(r"<p>raw \(x^2\) here</p><p>and $y$ too</p><pre>\(code is fine\)</pre><p>costs 5 $ only</p>")
    assert page.evaluate(RAW_TEX_JS) == [r"raw \(x^2\) here", "and $y$ too"]
    page.goto(urljoin(server, "book/approximation_rates.html"), wait_until="load", timeout=120_000)
    assert page.evaluate(MATHJAX_DONE_JS)["errors"] == []
    html = page.evaluate(r"""async () => {
        const host = document.querySelector('.math').parentElement;
        host.insertAdjacentHTML('beforeend', '<span class="math notranslate nohighlight" id="bad">\\(x^1^2\\)</span>');
        await MathJax.typesetPromise([host]);
        return document.getElementById('bad').innerHTML;
    }""")
    assert page.evaluate(MATHJAX_DONE_JS)["errors"], f"a TeX error was not reported: {html[:300]}"
    page.close()
