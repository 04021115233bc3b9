"""The rendered book in a real headless browser (Debian's chromium through Playwright).

Run after the book is built (``make book``; ``make test`` does both): every chapter must load, show its
figures decoded (``naturalWidth > 0``, not merely an ``<img>`` tag), render its math offline and carry a Colab
launch link. Screenshots of the intro and one chapter are kept in ``_build/screenshots/``.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The flags a closed network needs: no background connections, no updates, no GPU, no sandbox (root in CI).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip


def _pages() -> list[str]:
    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    return [toc["root"]] + [entry["file"] for part in toc["parts"] for entry in part["chapters"]]


@pytest.fixture(scope="module")
def site():
    if not (HTML / "index.html").exists():
        pytest.fail(f"no rendered book in {HTML}: build it first with `make book`")
    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(HTML)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: `apt-get install chromium` (make test does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield instance
        instance.close()


def _open(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    failed: list[str] = []
    page.on("requestfailed", lambda request: failed.append(request.url))
    response = page.goto(url, wait_until="load")
    assert response is not None and response.ok, f"{url}: HTTP {response and response.status}"
    return page, failed


def _decoded_images(page, site: str) -> tuple[int, list[str]]:
    """How many images the page's article shows, and which of them did not decode or are remote: the book must
    read offline (the chapters link to Colab with text, not with a remote badge image)."""
    images = page.eval_on_selector_all(
        "article img", "els => els.map(e => ({src: e.currentSrc || e.src, ok: e.complete && e.naturalWidth > 0}))"
    )
    return len(images), [i["src"] for i in images if not (i["ok"] and i["src"].startswith(site))]


@pytest.mark.parametrize("page_file", [p for p in _pages() if p.startswith("notebooks/")])
def test_chapter_loads_with_decoded_figures_and_colab_link(browser, site, page_file):
    page, failed = _open(browser, f"{site}/{page_file}.html")
    count, broken = _decoded_images(page, site)
    assert count >= 1, f"{page_file}: no figures on the page"
    assert not broken, f"{page_file}: figures not decoded: {broken}"
    assert page.locator("article h1").count() == 1
    colab = page.eval_on_selector_all("a[href*='colab.research.google.com/github/']", "els => els.map(e => e.href)")
    assert any(page_file.split("/")[-1] + ".ipynb" in href for href in colab), f"{page_file}: no Colab link"
    assert not [u for u in failed if u.startswith(site)], f"{page_file}: local requests failed: {failed}"
    if page_file.endswith("04_surgery"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "04_surgery.png"), full_page=False)
    page.close()


@pytest.mark.parametrize("page_file", [p for p in _pages() if not p.startswith("notebooks/")])
def test_prose_page_loads_and_renders_math_offline(browser, site, page_file):
    url = f"{site}/{page_file}.html"
    page, failed = _open(browser, url)
    assert page.locator("article").count() == 1
    if page_file.startswith("book/background"):
        page.wait_for_selector("mjx-container", timeout=15_000)  # MathJax is bundled, so this needs no network
    count, broken = _decoded_images(page, site)
    assert not broken, f"{page_file}: images not decoded: {broken}"
    assert not [u for u in failed if u.startswith(site)], f"{page_file}: local requests failed: {failed}"
    if page_file == _pages()[0]:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "intro.png"), full_page=False)
    page.close()
