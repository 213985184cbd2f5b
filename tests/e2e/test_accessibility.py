"""An automated accessibility pass (axe-core, vendored in tests/e2e/vendor) over every kind of page:
no serious or critical violation of WCAG 2.x A/AA rules. Keyboard operation of the upload result's patch
grid, the skip link, the focus outline and turning shortcuts off are checked by hand below, as axe cannot judge
them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import shot

AXE = (Path(__file__).parent / "vendor" / "axe.min.js").read_text()
TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"]


def serious_violations(page) -> list[str]:
    """axe runs through the DevTools protocol's evaluate, which the page's CSP does not govern."""
    page.evaluate(AXE)
    result = page.evaluate("tags => axe.run(document, {runOnly: {type: 'tag', values: tags}})", TAGS)
    return [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/layers/20",
        "/layers/20/features/8",
        "/search?q=dog",
        "/search?q=",
        "/layers/20?q=dog&sort=frequency",
        "/upload",
        "example",
    ],
)
def test_pages_have_no_serious_accessibility_violations(page, path):
    if path == "example":  # the large view of the feature's first top image, as its own page
        image_id = page.request.get("/api/layers/20/features/8").json()["top_images"][0]["image_id"]
        path = f"/layers/20/features/8/examples/{image_id}"
    response = page.goto(path)
    assert response.status < 400
    page.wait_for_load_state("networkidle")
    assert serious_violations(page) == []


def active(page, expression: str):
    return page.evaluate(f"(el => {expression})(document.activeElement)")


def test_skip_link_and_visible_focus(page):
    page.goto("/layers/20/features/8")
    page.wait_for_load_state("networkidle")
    page.keyboard.press("Tab")
    assert active(page, "el.className") == "skip-link"
    box = page.locator(".skip-link").bounding_box()
    assert box["y"] >= 0 and box["height"] > 0  # shown on screen once focused
    assert active(page, "getComputedStyle(el).outlineStyle") == "solid"
    assert float(active(page, "getComputedStyle(el).outlineWidth").removesuffix("px")) >= 2
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")  # the next stop is the first one inside <main>, past the header
    assert active(page, "el.closest('main') !== null")
    assert active(page, "getComputedStyle(el).outlineStyle") == "solid"
    shot(page, "12-keyboard-focus")


def test_upload_result_is_accessible_and_keyboard_operable(live_page, browser, live_server, tmp_path):
    from tests.e2e.test_upload import photo

    page = live_page
    page.goto("/upload")
    page.set_input_files("#upload-form input[type=file]", str(photo(tmp_path)[0]))
    page.wait_for_selector("#upload-result .upload-result")
    page.wait_for_load_state("networkidle")
    assert serious_violations(page) == []
    layer = page.locator("details.layer-result[open]").first
    cell = layer.locator("svg.live [data-p='136']")  # row 8, column 8
    cell.focus()
    assert page.evaluate("document.activeElement.getAttribute('data-p')") == "136"
    page.keyboard.press("Enter")
    assert "Patch (row 8, column 8)" in layer.locator(".patch-list").inner_text()
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.getAttribute('data-p')") == "137"
    page.keyboard.press(" ")
    assert "Patch (row 8, column 9)" in layer.locator(".patch-list").inner_text()
    page.keyboard.press("ArrowDown")
    assert page.evaluate("document.activeElement.getAttribute('data-p')") == "153"
    shot(page, "13-upload-keyboard")
    layer.locator("input[value=feature]").focus()
    page.keyboard.press("Tab")  # the grid is one Tab stop: the cell focused last
    assert page.evaluate("document.activeElement.getAttribute('data-p')") == "153"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.getAttribute('data-p')") is None
    assert layer.locator(".patch-hint").is_visible()

    plain = browser.new_context(java_script_enabled=False, base_url=live_server)
    try:  # without JavaScript the patches do nothing, so nothing invites a click or a key
        tab = plain.new_page()
        tab.goto(page.url)
        result = tab.locator("details.layer-result[open]").first
        assert result.locator("svg.live rect[data-p]").count() == 256
        assert not result.locator(".patch-hint").is_visible()
        assert "click" not in result.inner_text().lower()
        assert result.locator("svg.live [tabindex]").count() == 0
    finally:
        plain.close()


def test_single_key_shortcuts_can_be_turned_off(page):
    page.goto("/layers/20/features/8")
    page.wait_for_load_state("networkidle")
    overlay = page.locator(".grid .overlay").first
    hint = page.locator("label:has(#overlay-toggle) kbd")
    assert overlay.is_visible() and hint.is_visible()
    page.keyboard.press("o")
    assert overlay.is_hidden()  # the shortcut works until it is turned off
    page.keyboard.press("o")
    assert overlay.is_visible()
    page.click("#shortcuts-toggle")  # WCAG 2.1.4: character-key shortcuts can be turned off
    page.keyboard.press("o")
    assert overlay.is_visible()
    page.reload()
    page.wait_for_load_state("networkidle")
    page.keyboard.press("o")
    assert overlay.is_visible()  # the choice is remembered
    assert hint.is_hidden()  # and the pages stop offering the key
