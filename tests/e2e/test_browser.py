"""Drive the real app in Chromium: overview -> layer -> feature, overlay, large view,
similar feature, reload; keyboard shortcuts; and the same walk without JavaScript."""

from __future__ import annotations

import re
import time

from tests.e2e.conftest import ARTIFACTS, shot

FEATURE_URL = re.compile(r".*/layers/20/features/(\d+)$")


def wait_until(page, expression: str, timeout: float = 5.0) -> None:
    """Poll a JS expression (wait_for_function would need 'unsafe-eval', which our CSP forbids)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        page.wait_for_timeout(50)


def _feature_of(page) -> int:
    return int(FEATURE_URL.match(page.url).group(1))


def test_explore_a_feature(page):
    page.goto("/")
    page.wait_for_load_state("networkidle")
    shot(page, "01-overview")
    assert page.locator("h1").inner_text().startswith("Sparse autoencoder features")

    page.click('table.metrics a[href="/layers/20"]')
    page.wait_for_url("**/layers/20")
    page.click('table.features thead a:has-text("Max act.")')
    page.wait_for_url(re.compile(r".*sort=max_activation.*"))
    page.wait_for_load_state("networkidle")
    shot(page, "02-layer-sorted")
    first = page.locator("table.features tbody tr a").first
    target = first.get_attribute("href")
    first.click()
    page.wait_for_url(f"**{target}")
    page.wait_for_load_state("networkidle")
    feature = _feature_of(page)
    assert page.locator("h1").inner_text() == f"Layer 20 · feature {feature}"
    shot(page, "03-feature")

    overlay = page.locator(".grid .overlay").first
    assert overlay.is_visible()
    page.click("#overlay-toggle")
    assert overlay.is_hidden()
    shot(page, "04-feature-overlay-off")
    page.keyboard.press("o")
    assert overlay.is_visible()
    page.fill("#overlay-opacity", "0.3")
    assert page.evaluate("getComputedStyle(document.querySelector('.grid .overlay')).opacity") == "0.3"

    page.locator(".grid .tile a").first.click()
    page.wait_for_selector("dialog#modal[open] article.example")
    shot(page, "05-large-view")
    assert page.locator("dialog#modal svg.patches rect").count() == 256
    page.keyboard.press("Escape")
    page.wait_for_selector("dialog#modal:not([open])", state="attached")

    similar = page.locator("ol.similar a").first
    similar_url = similar.get_attribute("href")
    similar.click()
    page.wait_for_url(f"**{similar_url}")
    page.wait_for_load_state("networkidle")
    followed = _feature_of(page)
    assert followed != feature
    heading = page.locator("h1").inner_text()
    assert heading == f"Layer 20 · feature {followed}"
    wait_until(page, "document.getElementById('overlay-opacity').value === '0.3'")

    page.reload()
    page.wait_for_load_state("networkidle")
    assert _feature_of(page) == followed and page.locator("h1").inner_text() == heading
    shot(page, "06-similar-after-reload")
    assert page.problems == [], "\n".join(page.problems)


def test_keyboard_shortcuts_and_random(page):
    page.goto("/layers/20/features/10")
    page.wait_for_load_state("networkidle")
    page.keyboard.press("j")
    page.wait_for_url("**/layers/20/features/11")
    page.keyboard.press("k")
    page.wait_for_url("**/layers/20/features/10")
    page.keyboard.press("r")
    page.wait_for_url(lambda url: not url.endswith("/features/10"))
    assert FEATURE_URL.match(page.url)
    page.go_back()
    page.wait_for_url("**/layers/20/features/10")
    page.fill("form.jump input", "11/7")
    page.keyboard.press("Enter")
    page.wait_for_url("**/layers/11/features/7")
    assert page.locator("h1").inner_text() == "Layer 11 · feature 7"
    assert page.problems == [], "\n".join(page.problems)


def test_layer_table_paging_keeps_the_url(page):
    page.goto("/layers/11?page_size=20")
    page.click("nav.pager a[rel=next]")
    page.wait_for_url(re.compile(r".*page=2.*"))
    assert page.locator("table.features tbody tr").first.locator("a").inner_text() == "20"
    page.reload()
    assert page.locator("table.features tbody tr").first.locator("a").inner_text() == "20"
    page.go_back()
    page.wait_for_url(re.compile(r".*/layers/11\?page_size=20$"))
    assert page.problems == [], "\n".join(page.problems)


def test_works_without_javascript(browser, server):
    context = browser.new_context(java_script_enabled=False, base_url=server, viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.goto("/layers/20/features/8")
    tab.locator(".grid .tile a").first.click()
    tab.wait_for_url(re.compile(r".*/layers/20/features/8/examples/\d+$"))
    assert tab.locator("svg.patches rect").count() == 256
    tab.goto("/layers/20?page_size=10")
    tab.select_option("select[name=sort]", "frequency")
    tab.click("form.filters button[type=submit]")
    tab.wait_for_url(re.compile(r".*sort=frequency.*"))
    tab.screenshot(path=str(ARTIFACTS / "07-no-javascript-layer.png"), full_page=True)
    context.close()
