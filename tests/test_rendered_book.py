"""The rendered book in a real headless browser (Debian's chromium through Playwright).

Run after the book is built (``make book``; ``make test`` does both): every chapter must load, show its
figures decoded (``naturalWidth > 0``, not merely an ``<img>`` tag) and captioned, render its math offline, carry a
Colab launch link, and fit its code and every table (folds open) to the page; the headline tables show their
average without scrolling.
Screenshots of the intro, the Surgery and SurgeryV2 chapters and the reproduce page (the top of the page and the
whole page) are kept in ``_build/screenshots/`` for a look by eye.
"""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import threading
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
SCREENSHOT_PAGES = {"intro", "04_surgery", "05_surgery_v2", "reproduce"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The flags a closed network needs: no background connections, no updates, no GPU, no sandbox (root in CI).
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


TOC = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
#: The chapters' continuation pages (04_surgery_ablations ...): sections of their chapter in the table of contents.
SECTIONS = {
    section["file"] for part in TOC["parts"] for chapter in part["chapters"] for section in chapter.get("sections", [])
}


def _pages() -> list[str]:
    """Every page of the table of contents in reading order: the root, each chapter, then its sections."""

    def walk(entries: list[dict]) -> list[str]:
        return [page for entry in entries for page in [entry["file"], *walk(entry.get("sections", []))]]

    return [TOC["root"]] + walk([chapter for part in TOC["parts"] for chapter in part["chapters"]])


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
    number = int(page_file.split("/")[-1][:2])
    if number:  # chapter 00 is the unnumbered prelude; chapters 01-07 carry their files' numbers, figures n.1, n.2 ...
        heading = page.locator("article h1 .section-number").inner_text().strip()
        # A chapter's continuation page (04_surgery_ablations) is one of its sections, n.k; its figures are Fig. n.m.
        assert heading == f"{number}." or (page_file in SECTIONS and re.fullmatch(rf"{number}\.\d+\.", heading))
        captions = page.eval_on_selector_all("article figcaption .caption-number", "els => els.map(e => e.innerText)")
        assert all(c.strip().startswith(f"Fig. {number}.") for c in captions), f"{page_file}: {captions}"
    colab = page.eval_on_selector_all("a[href*='colab.research.google.com/github/']", "els => els.map(e => e.href)")
    assert any(page_file.split("/")[-1] + ".ipynb" in href for href in colab), f"{page_file}: no Colab link"
    assert not [u for u in failed if u.startswith(site)], f"{page_file}: local requests failed: {failed}"
    assert not _uncaptioned_figures(page), f"{page_file}: figures without a caption: {_uncaptioned_figures(page)}"
    # A code or printed line wider than the page makes its block scroll sideways: the reader never sees its end.
    wide = page.eval_on_selector_all(
        "article div.cell_input pre, article div.cell_output pre",
        "els => els.filter(e => e.clientWidth > 0 && e.scrollWidth > e.clientWidth + 1)"
        ".map(e => e.textContent.split('\\n').reduce((a, b) => a.length > b.length ? a : b))",
    )
    assert not wide, f"{page_file}: code wider than the page: {wide}"
    _screenshots(page, page_file)
    tables = _tables_wider_than_the_column(page)
    assert not tables, f"{page_file}: tables wider than the text column at 1280 px: {tables}"
    page.close()


def _uncaptioned_figures(page) -> list[str]:
    """The article's images that are not inside a figure with a caption of a sentence or more."""
    return page.eval_on_selector_all(
        "article img",
        "els => els.filter(e => { const caption = e.closest('figure') && e.closest('figure')"
        ".querySelector('figcaption'); return !(caption && caption.innerText.trim().length > 20); })"
        ".map(e => e.src.slice(-40))",
    )


def _tables_wider_than_the_column(page) -> list[str]:
    """The article's tables (every fold opened, as a reader who opens them sees them) that stick out of the text
    column: a table that scrolls sideways or is cut hides its last columns (a chapter's last tasks)."""
    page.evaluate("document.querySelectorAll('article details').forEach(d => { d.open = true; })")
    return page.evaluate(
        """() => {
            const article = document.querySelector('article');
            const right = article.getBoundingClientRect().right - parseFloat(getComputedStyle(article).paddingRight);
            return [...article.querySelectorAll('table')]
                .filter(t => t.getClientRects().length > 0)
                .filter(t => t.getBoundingClientRect().left + t.scrollWidth > right + 1)
                .map(t => `${Math.round(t.getBoundingClientRect().left + t.scrollWidth - right)} px too wide: `
                    + t.innerText.replace(/\\s+/g, ' ').slice(0, 70));
        }"""
    )


def _screenshots(page, page_file: str) -> None:
    name = page_file.split("/")[-1]
    if name in SCREENSHOT_PAGES:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=False)
        page.screenshot(path=str(SCREENSHOTS / f"{name}-full.png"), full_page=True)


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
    assert not _uncaptioned_figures(page), f"{page_file}: figures without a caption: {_uncaptioned_figures(page)}"
    _screenshots(page, page_file)
    tables = _tables_wider_than_the_column(page)
    assert not tables, f"{page_file}: tables wider than the text column at 1280 px: {tables}"
    page.close()


@pytest.mark.parametrize(
    ("page_file", "selector"),
    [
        ("notebooks/06_reproduce_tables", "article table.readable-table"),
        ("book/results", "article table"),
    ],
)
def test_the_headline_table_shows_its_average_without_scrolling(browser, site, page_file, selector):
    page, _ = _open(browser, f"{site}/{page_file}.html")
    table = page.locator(selector).first
    table.scroll_into_view_if_needed()
    box = page.evaluate(
        """table => {
            const header = [...table.querySelectorAll('thead th')].find(th => th.innerText.trim() === 'average');
            if (!header) return null;
            let clip = table.parentElement;  // the nearest ancestor that scrolls sideways, if any
            while (clip && getComputedStyle(clip).overflowX === 'visible') clip = clip.parentElement;
            const right = Math.min(window.innerWidth, clip ? clip.getBoundingClientRect().right : window.innerWidth);
            const r = header.getBoundingClientRect();
            return {left: r.left, right: r.right, visible: right};
        }""",
        table.element_handle(),
    )
    assert box is not None, f"{page_file}: the first table has no 'average' column"
    assert 0 <= box["left"] and box["right"] <= box["visible"], f"{page_file}: the average column is off-screen: {box}"
    page.close()
