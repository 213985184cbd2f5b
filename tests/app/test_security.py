"""Security headers everywhere; templates carry no inline script, style or handlers (CSP)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from clipscope_explorer.app.serving.security import (
    CONTENT_SECURITY_POLICY,
    EMBED_PATH,
    SECURITY_HEADERS,
    embed_headers,
)
from tests.app.route_walk import endpoints, fill

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


@pytest.mark.parametrize(
    "url",
    [
        "/",
        "/api",
        "/layers/20",
        "/layers/20/features/8",
        "/static/style.css",
        "/static/vendor/htmx.min.js",
        "/layers/99",
        "/api/nothing",
        "/docs",
        "/openapi.json",
    ],
)
def test_security_headers(client, url):
    headers = client.get(url).headers
    assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "strict-origin-when-cross-origin"
    assert headers["x-frame-options"] == "DENY"


def assert_secured(response, what, expected=SECURITY_HEADERS) -> None:
    for name, value in expected:
        assert response.headers.get(name.decode()) == value.decode(), (what, response.status_code, name)


def expected_headers(client, url: str):
    """The embeddable card may be framed (tests/app/test_embed.py); every other answer may not."""
    if EMBED_PATH.fullmatch(url.split("?")[0]):
        return embed_headers(client.app.state.settings.embed_origins)
    return SECURITY_HEADERS


def test_every_route_and_every_kind_of_answer_is_secured(client, index):
    """Every route of the app (walked from app.routes) with good and bad values, and each status it can give."""
    image_id = index.examples(20, 8, heatmaps=False)[0]["image_id"]
    good = {"layer": "20", "feature": "8", "image_id": str(image_id), "index_id": index.index_id, "upload_id": "0" * 32}
    bad = {name: "999999" if name != "index_id" else "x" for name in good}
    seen = set()
    for endpoint in endpoints(client.app):
        for values in (good, bad):
            url = fill(endpoint.path, values)
            for method in sorted(endpoint.methods | {"HEAD", "DELETE"}):
                response = client.request(method, url)
                assert_secured(response, f"{method} {url}", expected_headers(client, url))
                seen.add(response.status_code)
    thumbnail = f"/images/{index.index_id}/{image_id}.jpg"
    cached = client.get(thumbnail, headers={"If-None-Match": client.get(thumbnail).headers["etag"]})
    extra = [
        cached,
        client.get("/search?q=20/8"),
        client.get("/layers/20?page=x"),
        client.get("/nowhere"),
        client.options("/api/layers", headers={"Origin": "https://a.org", "Access-Control-Request-Method": "GET"}),
        client.post("/api/encode", headers={"Origin": "https://a.org"}),
        client.get("/static/style.css", headers={"Range": "bytes=0-9"}),
        client.get("/static/style.css", headers={"Range": "bytes=999999-"}),
    ]
    for response in extra:
        assert_secured(response, response.url)
        seen.add(response.status_code)
    assert {200, 204, 206, 303, 304, 403, 404, 405, 416, 422, 503} <= seen, seen


def test_upload_refusals_are_secured(live_client):
    for response in (
        live_client.post("/api/encode", content=b"x", headers={"content-type": "text/plain"}),
        live_client.post("/api/encode", files={"file": ("a", b"")}),
        live_client.post("/upload", files={"file": ("a", b"")}),
        live_client.post(
            "/api/encode",
            content=b"0" * 10,
            headers={"content-type": "multipart/form-data; boundary=x", "content-length": str(10**10)},
        ),
    ):
        assert response.status_code in (400, 413, 415)
        assert_secured(response, response.status_code)


def test_policy_allows_nothing_inline_or_remote():
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY and "unsafe-eval" not in CONTENT_SECURITY_POLICY
    assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY
    assert "http" not in CONTENT_SECURITY_POLICY


def test_images_carry_security_headers(client, index):
    image_id = index.examples(20, 8, heatmaps=False)[0]["image_id"]
    headers = client.get(f"/images/{index.index_id}/{image_id}.jpg").headers
    assert headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("template", sorted(p.name for p in TEMPLATES.glob("*.html")))
def test_templates_have_no_inline_script_style_or_handlers(template):
    text = (TEMPLATES / template).read_text()
    assert not re.search(r"<script(?![^>]*\ssrc=)", text), "inline <script>"
    assert not re.search(r"<style", text), "<style> element"
    assert not re.search(r"\sstyle=", text), "style= attribute"
    assert not re.search(r"\son[a-z]+=", text), "on*= handler"
    assert not re.search(r"(src|href)=\"(https?:)?//", text), "remote asset"


def test_rendered_pages_have_no_inline_script(client):
    for url in ("/", "/layers/20", "/layers/20/features/8", "/search?q=cat", "/docs"):
        text = client.get(url).text
        assert not re.search(r"<script(?![^>]*\ssrc=)", text), url
        assert not re.search(r"\sstyle=", text), url


def test_user_text_is_escaped(client):
    text = client.get("/search", params={"q": "<script>alert(1)</script>"}).text
    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;" in text


def test_htmx_is_served_locally_with_its_licence(client):
    assert client.get("/static/vendor/htmx.min.js").status_code == 200
    assert (
        "Zero-Clause BSD" in client.get("/static/vendor/htmx.LICENSE").text
        or "BSD" in client.get("/static/vendor/htmx.LICENSE").text
    )
