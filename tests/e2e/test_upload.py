"""Upload an image in Chromium: file picker, result, heatmap switch, patch click, winner map,
share link after reload; drag-and-drop and paste; an upload error shown in place."""

from __future__ import annotations

import base64
import re

from PIL import Image

from tests.e2e.conftest import ARTIFACTS, shot
from tests.e2e.test_browser import wait_until
from tests.fixtures import shape_image


def photo(tmp_path, seed: int = 3, size=(640, 480)):
    image, caption = shape_image(seed, size)
    path = tmp_path / "photo.jpg"
    image.save(path, quality=92)
    return path, caption


def test_upload_and_explore_the_result(live_page, tmp_path):
    page = live_page
    page.goto("/upload")
    page.wait_for_load_state("networkidle")
    shot(page, "08-upload-form")
    path, caption = photo(tmp_path)
    page.set_input_files("#upload-form input[type=file]", str(path))  # choosing a file submits it
    page.wait_for_selector("#upload-result .upload-result")
    page.wait_for_url(re.compile(r".*/uploads/[0-9a-f]{32}\?sort=max$"))
    page.wait_for_load_state("networkidle")
    layer = page.locator("details.layer-result[open]").first
    assert layer.get_attribute("data-layer") == "2"  # the deepest layer opens first
    features = layer.locator("li.live-feature")
    assert features.count() == 16
    assert features.first.locator(".term").count() >= 1  # label terms from the index
    assert features.first.locator(".examples img").count() == 4  # four top images from the index

    second = features.nth(1)
    wanted = second.locator("img.overlay").get_attribute("src")
    second.locator(".show-overlay").click()
    assert layer.locator("image.feature-map").get_attribute("href") == wanted
    assert layer.locator(".shown-feature").inner_text() == second.get_attribute("data-feature")

    layer.locator("svg.live rect[data-p='136']").click()  # row 8, column 8
    listing = layer.locator(".patch-list")
    assert "Patch (row 8, column 8)" in listing.inner_text()
    assert listing.locator("li a").count() >= 1
    shot(page, "09-upload-result")

    layer.locator("input[value=winner]").check()
    assert layer.locator("image.winner-map").is_visible() and not layer.locator("image.feature-map").is_visible()
    assert layer.locator(".winner-legend li").count() >= 1
    shot(page, "10-upload-winner-map")

    other = page.locator("details.layer-result[data-layer='1']")
    assert other.get_attribute("open") is None
    other.locator("summary").click()  # the other layer loads when opened
    other.locator(".live-view li.live-feature").first.wait_for()

    url = page.url
    page.reload()
    page.wait_for_load_state("networkidle")
    assert page.url == url and page.locator("details.layer-result[open] li.live-feature").count() == 16
    assert page.locator('meta[property="og:image"]').get_attribute("content").endswith("/preview.jpg")
    page.click(".sort-switch a:has-text('CLS activation')")
    page.wait_for_url(re.compile(r".*sort=cls$"))
    assert page.locator('.sort-switch b[aria-current="true"]').inner_text() == "CLS activation"
    assert page.problems == [], "\n".join(page.problems)


def test_drop_and_paste_upload(live_page, tmp_path):
    page = live_page
    page.goto("/upload")
    page.wait_for_load_state("networkidle")
    for kind, seed in (("drop", 5), ("paste", 6)):
        path, _ = photo(tmp_path, seed, (300, 200))
        data = base64.b64encode(path.read_bytes()).decode()
        page.evaluate(
            """([kind, data]) => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "image.jpg", {type: "image/jpeg"}));
            const event = kind === "drop"
                ? new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true})
                : new ClipboardEvent("paste", {clipboardData: transfer, bubbles: true, cancelable: true});
            document.querySelector("#drop-zone").dispatchEvent(event);
        }""",
            [kind, data],
        )
        page.wait_for_url(re.compile(r".*/uploads/[0-9a-f]{32}\?sort=max$"))
        page.wait_for_selector("#upload-result .upload-result")
        page.goto("/upload")
    assert page.problems == [], "\n".join(page.problems)


def test_an_upload_error_is_shown_in_place(live_page, tmp_path):
    page = live_page
    page.goto("/upload")
    page.wait_for_load_state("networkidle")
    bad = tmp_path / "drawing.svg"
    bad.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"></svg>')
    page.set_input_files("#upload-form input[type=file]", str(bad))
    page.wait_for_selector("#upload-result .upload-error")
    assert "SVG is a vector format" in page.locator(".upload-error").inner_text()
    assert page.url.endswith("/upload")
    page.problems[:] = [p for p in page.problems if not re.match(r"(415 |console error: Failed to load resource)", p)]
    assert page.problems == [], "\n".join(page.problems)
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (255, 0, 0)).save(tiny)
    page.set_input_files("#upload-form input[type=file]", str(tiny))
    page.wait_for_selector("#upload-result .upload-result")
    wait_until(page, "document.querySelector('#upload-result .upload-error') === null")
    page.screenshot(path=str(ARTIFACTS / "11-upload-tiny.png"), full_page=False)


def test_intervene_from_the_result_page(live_page, tmp_path):
    """'Edit' on a feature fills the form; Shift-click picks patches; the result arrives in place with a
    permalink pushed to the address bar; a bad scale shows its message in place."""
    page = live_page
    page.goto("/upload")
    path, _ = photo(tmp_path, seed=8)
    page.set_input_files("#upload-form input[type=file]", str(path))
    page.wait_for_url(re.compile(r".*/uploads/[0-9a-f]{32}\?sort=max$"))
    page.wait_for_load_state("networkidle")
    layer_one = page.locator("details.layer-result[data-layer='1']")
    layer_one.locator("summary").click()
    first = layer_one.locator("li.live-feature").first
    first.wait_for()
    first.locator(".edit-feature").click()
    form = page.locator("form.intervene-form")
    assert form.locator("select[name=layer]").input_value() == "1"
    assert form.locator("input[name=feature]").input_value() == first.get_attribute("data-feature")
    deepest = page.locator("details.layer-result[data-layer='2']")
    deepest.locator("svg.live rect[data-p='17']").click(modifiers=["Shift"])
    deepest.locator("svg.live rect[data-p='3']").click(modifiers=["Shift"])
    assert form.locator("input[name=patches]").input_value() == "17,3"
    deepest.locator("svg.live rect[data-p='17']").click(modifiers=["Shift"])  # again: removed
    assert form.locator("input[name=patches]").input_value() == "3"
    assert deepest.locator("rect.chosen").count() == 1
    form.locator("input[name=patches]").fill("")  # every token
    form.locator("input[name=scale]").fill("0")
    form.locator("button[type=submit]").click()
    result = page.locator("#intervention .intervention-result")
    result.wait_for()
    page.wait_for_url(re.compile(r".*/uploads/[0-9a-f]{32}/interventions/[0-9a-f]{32}$"))
    assert "scaled by 0" in result.locator("h2").inner_text()
    assert result.locator("details.layer-result[open] ol.changes li").count() == 20
    assert result.locator("table.prompt-scores tbody tr").count() == 5  # the zero-shot labels
    shot(page, "11-intervention")
    permalink = page.url
    page.goto(permalink)
    assert page.locator("#intervention .intervention-result ol.changes li").count() >= 20

    page.go_back()
    page.wait_for_load_state("networkidle")
    page.locator("form.intervene-form input[name=scale]").evaluate("e => { e.max = ''; e.value = '12'; }")
    page.locator("form.intervene-form button[type=submit]").click()
    page.locator("#intervention .upload-error").wait_for()
    assert "scale must be a number in [-10, 10]" in page.locator("#intervention").inner_text()
    problems = [p for p in page.problems if not p.startswith("422 ") and "status of 422" not in p]  # the refusal
    assert problems == [], "\n".join(problems)
