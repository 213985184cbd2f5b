"""A real server under a path prefix (`CLIPSCOPE_ROOT_PATH`): crawled from its overview, every URL a page
writes carries the prefix and answers, whether a proxy forwards the prefix or strips it; HEAD goes over
the wire without a body; in Chromium, htmx requests and the upload page's script stay under the prefix."""

from __future__ import annotations

import html
import os
import re
import shutil
import time
from collections import deque
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import new_tab, run_server
from tests.fixtures import shape_image

PREFIX = "/explorer"
URL_ATTRIBUTE = re.compile(r'\s(?:href|src|action|hx-get)="(/[^"]*)"')


@pytest.fixture(scope="module")
def prefixed_server(e2e_index, tmp_path_factory):
    env = {**os.environ, "CLIPSCOPE_ROOT_PATH": PREFIX}
    yield from run_server(
        e2e_index,
        "--no-live",
        "--upload-store",
        str(tmp_path_factory.mktemp("uploads")),
        ready=PREFIX + "/",
        env=env,
        log_path=tmp_path_factory.mktemp("log") / "server.log",
    )


def test_a_crawl_under_the_prefix_finds_only_prefixed_working_urls(prefixed_server):
    seen, queue = {PREFIX + "/"}, deque([PREFIX + "/"])
    with httpx.Client(base_url=prefixed_server, timeout=30) as client:
        while queue and len(seen) < 150:
            url = queue.popleft()
            response = client.get(url)
            assert response.status_code in (200, 303), url
            if response.status_code == 303:
                assert response.headers["location"].startswith(PREFIX + "/"), url
                continue
            if not response.headers["content-type"].startswith("text/html"):
                continue
            for link in map(html.unescape, URL_ATTRIBUTE.findall(response.text)):
                assert link.startswith(PREFIX + "/"), (url, link)
                if link not in seen and "/random" not in link:
                    seen.add(link)
                    queue.append(link)
    kinds = {"/static/", "/images/", "/layers/20/features/", "/api", "/search", "/upload", "/docs"}
    assert all(any(kind in link for link in seen) for kind in kinds), kinds


def test_a_proxy_that_strips_the_prefix(prefixed_server):
    """The proxy forwards `/layers/20`; the page still links under the prefix."""
    page = httpx.get(prefixed_server + "/layers/20", timeout=30)
    assert page.status_code == 200
    assert f'<link rel="alternate" type="application/json" href="{PREFIX}/api/layers/20">' in page.text
    jump = httpx.get(prefixed_server + "/search?q=20/7", timeout=30)
    assert jump.status_code == 303 and jump.headers["location"] == PREFIX + "/layers/20/features/7"


def test_head_over_the_wire(prefixed_server):
    get = httpx.get(prefixed_server + PREFIX + "/layers/20", timeout=30)
    head = httpx.head(prefixed_server + PREFIX + "/layers/20", timeout=30)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.content))


def test_a_browser_stays_under_the_prefix(browser, tiny_index, tmp_path):
    """Upload, click a patch (its feature links come from the page's data- attributes), open a feature and
    an example in the dialog (htmx): no request of this origin fails, and every link keeps the prefix."""
    index = Path(shutil.copy(tiny_index, tmp_path / "tiny.duckdb"))
    env = {**os.environ, "CLIPSCOPE_ROOT_PATH": PREFIX}
    running = run_server(index, "--upload-store", str(tmp_path / "uploads"), ready=PREFIX + "/", env=env)
    base = next(running)
    try:
        deadline = time.monotonic() + 60
        while httpx.get(base + PREFIX + "/api/upload", timeout=5).json()["live"]["state"] == "loading":
            assert time.monotonic() < deadline, "live encoder did not load"
            time.sleep(0.2)
        tab = new_tab(browser, base)
        tab.goto(PREFIX + "/upload")
        tab.wait_for_selector("#upload-form")
        image, _ = shape_image(3, (640, 480))
        image.save(tmp_path / "photo.jpg", quality=92)
        tab.set_input_files("#upload-form input[type=file]", str(tmp_path / "photo.jpg"))
        tab.wait_for_url(re.compile(re.escape(base + PREFIX) + r"/uploads/[0-9a-f]{32}\?sort=max$"))
        layer = tab.locator("details.layer-result[open]").first
        layer.locator(".live-feature .examples a").first.click()  # an index example, fetched by htmx
        tab.wait_for_selector("dialog#modal[open] svg.patches")
        tab.keyboard.press("Escape")
        layer.locator("svg.live rect[data-p='136']").click()
        hrefs = layer.locator(".patch-list li a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
        assert hrefs and all(re.fullmatch(re.escape(PREFIX) + r"/layers/2/features/\d+", h) for h in hrefs), hrefs
        tab.click(f".patch-list li a[href='{hrefs[0]}']")  # a boosted link: htmx fetches the page
        tab.wait_for_url(base + hrefs[0])
        tab.wait_for_load_state("networkidle")
        assert tab.problems == [], "\n".join(tab.problems)
        tab.context.close()
    finally:
        running.close()
