"""`clipscope-explorer demo` end to end: generate, fit, precompute, serve, browse, upload.

Runs the real command with a smaller image count, then drives the served demo
in Chromium. The screenshots it saves (test-artifacts/demo-*.png) are the
ones the README shows (docs/img/).
"""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from clipscope_explorer.precompute.demo.scenes import OBJECT_COLOURS
from tests.e2e.conftest import REPO, _free_port, new_tab, shot, stop_process

N_IMAGES = 600


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    data = tmp_path_factory.mktemp("demo_cli")
    port = _free_port()
    log_path = data / "demo.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clipscope_explorer.cli",
                "demo",
                "--images",
                str(N_IMAGES),
                "--data",
                str(data),
                "--port",
                str(port),
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            try:
                if httpx.get(base + "/api/upload", timeout=5).json()["live"]["state"] == "ready":
                    break
            except (httpx.TransportError, ValueError, KeyError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"demo did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base, data
    finally:
        stop_process(process)


def object_feature(base: str) -> tuple[int, int]:
    """A busy feature of the demo whose most distinctive caption word is an object colour."""
    for layer in (1, 3):
        rows = httpx.get(f"{base}/api/layers/{layer}?sort=image_frequency&order=desc&page_size=200").json()
        for row in rows["features"]:
            if row["label_terms"] and row["label_terms"][0] in OBJECT_COLOURS:
                return layer, row["feature"]
    pytest.fail("the demo has no object-colour feature")


def test_demo_serves_its_index_and_encodes_uploads(demo_server):
    base, data = demo_server
    overview = httpx.get(f"{base}/api").json()
    assert overview["index"]["demo"] is True and overview["index"]["sample"]["n_images"] == N_IMAGES
    for path in ("/", "/layers/1", "/upload", "/search"):  # every page says it is a demo
        assert "Demo index." in httpx.get(base + path).text, path
    layer, feature = object_feature(base)
    page = httpx.get(f"{base}/layers/{layer}/features/{feature}")
    assert page.status_code == 200 and f"feature {feature}" in page.text
    image = (data / "images" / "00007.jpg").read_bytes()
    encoded = httpx.post(
        f"{base}/api/encode", files={"file": ("x.jpg", image, "image/jpeg")}, data={"layers": "1,3"}, timeout=60
    )
    assert encoded.status_code == 200, encoded.text
    result = encoded.json()
    assert set(result["layers"]) == {"1", "3"}
    top = result["layers"]["1"]["features"][0]
    assert len(top["heatmap"]) == 256 and top["activation"] > 0


def test_demo_in_the_browser(demo_server, browser):
    base, data = demo_server
    layer, feature = object_feature(base)
    tab = new_tab(browser, base)
    try:
        tab.goto(f"/layers/{layer}/features/{feature}")
        tab.wait_for_load_state("networkidle")
        for image in tab.locator("img[loading=lazy]").all():
            image.scroll_into_view_if_needed()
        tab.wait_for_load_state("networkidle")
        shot(tab, "demo-feature")
        tab.goto("/upload")
        tab.set_input_files("#upload-form input[type=file]", str(data / "images" / "00011.jpg"))
        tab.wait_for_selector("#upload-result .upload-result")
        tab.wait_for_load_state("networkidle")
        shot(tab, "demo-upload")
        assert not tab.problems, tab.problems
    finally:
        tab.context.close()
